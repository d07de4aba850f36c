"""multidatabackend.json: SimpleTuner-style dataset lists, their per-entry rules and the links between entries."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from longcat_dist.config_data import DatasetConfig, load_data_backends
from longcat_dist.config_values import ConfigError

# The SimpleTuner LongCat-Video Edit (I2V) quickstart list, plus the eval split's own start frames.
QUICKSTART_BACKENDS = [
    {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": "data/clips",
     "caption_strategy": "textfile", "resolution": 480, "resolution_type": "pixel_area",
     "cache_dir_vae": "cache/clips", "video": {"num_frames": 93, "min_frames": 93, "is_i2v": True},
     "conditioning_data": ["start-frames"]},
    {"id": "start-frames", "type": "local", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
     "instance_data_dir": "data/start_frames", "caption_strategy": "textfile"},
    {"id": "longcat-video-val", "type": "local", "dataset_type": "video", "instance_data_dir": "data/val",
     "caption_strategy": "textfile", "resolution": 480, "resolution_type": "pixel_area",
     "cache_dir_vae": "cache/val", "is_i2v": True, "video": {"num_frames": 93},
     "conditioning_data": "val-start-frames"},
    {"id": "val-start-frames", "type": "local", "dataset_type": "conditioning",
     "conditioning_type": "reference_strict", "instance_data_dir": "data/val_start_frames",
     "caption_strategy": "textfile"},
    {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
]  # fmt: skip


def backends() -> list[dict]:
    """A fresh, editable copy of the quickstart list."""
    return copy.deepcopy(QUICKSTART_BACKENDS)


def write_backends(tmp_path: Path, entries: object) -> Path:
    """Write `entries` as multidatabackend.json under tmp_path."""
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


def load_error(tmp_path: Path, entries: object) -> str:
    """The message of the ConfigError that loading `entries` raises."""
    with pytest.raises(ConfigError) as info:
        load_data_backends(write_backends(tmp_path, entries))
    return str(info.value)


def by_id(datasets: tuple[DatasetConfig, ...]) -> dict[str, DatasetConfig]:
    return {ds.id: ds for ds in datasets}


def test_quickstart_list_loads_with_paths_resolved_against_its_directory(tmp_path: Path) -> None:
    datasets = by_id(load_data_backends(write_backends(tmp_path, backends())))
    clips = datasets["clips"]
    assert list(datasets) == ["clips", "start-frames", "longcat-video-val", "val-start-frames", "text-embeds"]
    assert clips.dataset_type == "video" and clips.is_i2v
    assert clips.conditioning_data == ("start-frames",)
    assert clips.cache_dir_vae == (tmp_path / "cache/clips").resolve()
    assert clips.instance_data_dir == (tmp_path / "data/clips").resolve()
    assert (clips.num_frames, clips.min_frames, clips.resolution) == (93, 93, 480)
    assert datasets["text-embeds"].cache_dir == (tmp_path / "cache/text").resolve()
    assert datasets["start-frames"].extra == {"conditioning_type": "reference_strict"}


def test_is_i2v_is_read_at_top_level_and_one_conditioning_id_may_be_a_string(tmp_path: Path) -> None:
    val = by_id(load_data_backends(write_backends(tmp_path, backends())))["longcat-video-val"]
    assert val.is_i2v
    assert val.conditioning_data == ("val-start-frames",)
    # min_frames defaults to num_frames, as in SimpleTuner.
    assert val.min_frames == 93


def test_is_i2v_top_level_and_video_block_must_agree(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["is_i2v"] = False
    message = load_error(tmp_path, entries)
    assert "clips.is_i2v" in message and "disagrees with video.is_i2v" in message


def test_ignored_simpletuner_keys_are_kept_and_listed_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entries = backends()
    entries[0]["crop"] = True
    with caplog.at_level(logging.WARNING, logger="longcat_dist.config_data"):
        datasets = by_id(load_data_backends(write_backends(tmp_path, entries)))
    assert datasets["clips"].extra == {"crop": True}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "clips: crop" in warnings[0] and "text-embeds: default" in warnings[0]


def test_i2v_dataset_without_conditioning_data_is_refused(tmp_path: Path) -> None:
    entries = backends()
    del entries[0]["conditioning_data"]
    message = load_error(tmp_path, entries)
    assert "clips.conditioning_data" in message
    assert "an is_i2v dataset needs conditioning_data" in message


def test_conditioning_data_naming_a_missing_id_lists_the_ids_that_exist(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["conditioning_data"] = ["start-frame"]
    message = load_error(tmp_path, entries)
    assert "clips.conditioning_data" in message and "'start-frame'" in message
    assert "no dataset has this id" in message
    assert "ids: clips, longcat-video-val, start-frames, text-embeds, val-start-frames" in message


def test_conditioning_data_must_name_a_conditioning_or_image_dataset(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["conditioning_data"] = ["text-embeds"]
    message = load_error(tmp_path, entries)
    assert "clips.conditioning_data" in message and "'text-embeds'" in message
    assert "a text_embeds dataset; it must be a conditioning or image dataset" in message


def test_an_image_dataset_is_accepted_as_start_frames(tmp_path: Path) -> None:
    entries = backends()
    entries[1]["dataset_type"] = "image"
    datasets = by_id(load_data_backends(write_backends(tmp_path, entries)))
    assert datasets["start-frames"].dataset_type == "image"


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    entries = backends()
    entries[3]["id"] = "start-frames"
    entries[2]["conditioning_data"] = ["start-frames"]
    message = load_error(tmp_path, entries)
    assert "start-frames.id" in message and "duplicate dataset id" in message


def test_unknown_dataset_key_suggests_the_closest_known_key(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["instance_data_dri"] = "data/clips"
    message = load_error(tmp_path, entries)
    assert "clips.instance_data_dri" in message and "unknown dataset key" in message
    assert "did you mean 'instance_data_dir'?" in message


def test_unknown_key_in_the_video_block_is_refused(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["video"]["num_frame"] = 93
    message = load_error(tmp_path, entries)
    assert "clips.video.num_frame" in message and "did you mean 'num_frames'?" in message


def test_video_frames_must_follow_the_vae_stride(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["video"].update(num_frames=90, min_frames=90)
    message = load_error(tmp_path, entries)
    assert "clips.video.num_frames" in message and "= 90" in message
    assert "(frames - 1) % 4 == 0" in message and "use 89 or 93" in message


def test_min_frames_below_num_frames_is_refused(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["video"]["min_frames"] = 81
    message = load_error(tmp_path, entries)
    assert (
        "clips.video.min_frames" in message and "= 81" in message and "must be >= video.num_frames" in message
    )


def test_video_dataset_needs_cache_dir_vae_for_its_shards(tmp_path: Path) -> None:
    entries = backends()
    del entries[0]["cache_dir_vae"]
    message = load_error(tmp_path, entries)
    assert "clips.cache_dir_vae" in message and "writes this dataset's shards" in message


@pytest.mark.parametrize("url", ["s3://bucket/shards/clips", "pipe:aws s3 cp s3://bucket/clips/{}"])
def test_shard_roots_given_as_urls_stay_urls(tmp_path: Path, url: str) -> None:
    entries = backends()
    entries[0]["cache_dir_vae"] = url
    clips = {d.id: d for d in load_data_backends(write_backends(tmp_path, entries))}["clips"]
    assert clips.cache_dir_vae == url


def test_two_video_datasets_cannot_share_a_shard_root(tmp_path: Path) -> None:
    entries = backends()
    entries[2]["cache_dir_vae"] = "cache/clips"
    message = load_error(tmp_path, entries)
    assert "longcat-video-val.cache_dir_vae" in message and "also used by 'clips'" in message


def test_text_to_video_datasets_are_refused(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["video"]["is_i2v"] = False
    del entries[0]["conditioning_data"]
    message = load_error(tmp_path, entries)
    assert "clips.is_i2v" in message and "image-to-video only" in message


def test_remote_sources_are_refused(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["type"] = "aws"
    message = load_error(tmp_path, entries)
    assert "clips.type" in message and "'aws'" in message and "only type 'local' is supported" in message


def test_wrong_value_type_names_the_expected_type(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["repeats"] = "many"
    message = load_error(tmp_path, entries)
    assert "clips.repeats" in message and "'many'" in message and "expected an integer" in message


def test_resolution_must_be_divisible_by_16(tmp_path: Path) -> None:
    entries = backends()
    entries[0]["resolution"] = 500
    message = load_error(tmp_path, entries)
    assert "clips.resolution" in message and "= 500" in message and "divisible by 16" in message


def test_unsupported_dataset_type_is_refused(tmp_path: Path) -> None:
    entries = backends()
    entries[1]["dataset_type"] = "eval"
    message = load_error(tmp_path, entries)
    assert "start-frames.dataset_type" in message and "unsupported dataset_type" in message


def test_disabled_datasets_may_omit_shard_paths_but_not_be_someones_start_frames(tmp_path: Path) -> None:
    entries = backends()
    entries[1]["disable"] = True
    message = load_error(tmp_path, entries)
    assert "clips.conditioning_data" in message and "names a disabled dataset" in message


def test_a_list_without_an_enabled_video_dataset_is_refused(tmp_path: Path) -> None:
    entries = [e for e in backends() if e["dataset_type"] != "video"]
    message = load_error(tmp_path, entries)
    assert "no enabled video dataset" in message


def test_the_file_must_be_a_json_list(tmp_path: Path) -> None:
    message = load_error(tmp_path, {"id": "clips"})
    assert "multidatabackend.json" in message and "expected a non-empty JSON list" in message


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "multidatabackend.json"
    path.write_text('[\n  {"id": "clips",}\n]\n')
    with pytest.raises(ConfigError) as info:
        load_data_backends(path)
    message = str(info.value)
    assert str(path) in message and "line 2, column 18" in message and "trailing comma" in message


def test_missing_file_names_the_resolved_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_data_backends(tmp_path / "nope.json")
    assert f"resolved to {tmp_path / 'nope.json'}" in str(info.value)
