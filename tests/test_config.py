"""config.json: the quickstart keys and defaults, our own keys, and every rule load_config enforces."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_config_data import backends, write_backends

from longcat_dist.config import (
    KNOWN_IGNORED,
    ConfigError,
    TrainConfig,
    check_frames,
    check_resolution,
    load_config,
)
from longcat_dist.config_data import DATASET_KEYS, VIDEO_KEYS

# The SimpleTuner LongCat-Video Edit quickstart config.json, plus the one key it must add here: a local checkpoint.
QUICKSTART = {
    "model_family": "longcat_video", "model_flavour": "final", "model_type": "lora", "train_batch_size": 1,
    "gradient_checkpointing": True, "lora_rank": 8, "learning_rate": 1e-4, "validation_resolution": "480x832",
    "validation_num_video_frames": 93, "validation_num_inference_steps": 40, "validation_guidance": 4.0,
    "validation_using_datasets": True, "eval_dataset_id": "longcat-video-val", "output_dir": "output/run",
    "data_backend_config": "config/multidatabackend.json", "aspect_bucket_alignment": 64,
    "pretrained_model_name_or_path": "models/LongCat-Video",
}  # fmt: skip


def write_config(tmp_path: Path, **changes: object) -> Path:
    """Write the quickstart pair under tmp_path (config.json + config/multidatabackend.json), with `changes`."""
    (tmp_path / "config").mkdir(exist_ok=True)
    write_backends(tmp_path / "config", backends())
    raw = {**QUICKSTART, **changes}
    raw = {key: value for key, value in raw.items() if value is not DROP}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


DROP = object()  # a `changes` value that removes the key


def config_error(tmp_path: Path, **changes: object) -> str:
    """The message of the ConfigError that loading the quickstart with `changes` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, **changes))
    return str(info.value)


def test_quickstart_loads_with_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    assert isinstance(cfg, TrainConfig)
    assert (cfg.validation_height, cfg.validation_width) == (480, 832)
    assert cfg.flow_schedule_shift == 12.0 and cfg.aspect_bucket_alignment == 64
    assert (cfg.num_frames, cfg.resolution, cfg.validation_num_video_frames) == (93, 480, 93)
    assert (cfg.validation_num_inference_steps, cfg.validation_guidance) == (40, 4.0)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.learning_rate, cfg.train_batch_size) == (8, 8.0, 1e-4, 1)
    assert cfg.gradient_checkpointing and cfg.zero_stage == 2
    assert cfg.lora_targets == ("qkv", "proj", "q_linear", "kv_linear")
    assert cfg.deepspeed_config.name == "zero2.json" and cfg.deepspeed_config.is_file()


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    assert cfg.output_dir == (tmp_path / "output/run").resolve()
    assert cfg.data_backend_config == (tmp_path / "config/multidatabackend.json").resolve()
    assert cfg.pretrained_model_name_or_path == (tmp_path / "models/LongCat-Video").resolve()
    # Dataset paths resolve against the directory of multidatabackend.json, not of config.json.
    assert cfg.dataset("clips").cache_dir_vae == (tmp_path / "config/cache/clips").resolve()
    assert cfg.storage_path == str(cfg.output_dir / "ray")


def test_simpletuner_layout_reads_paths_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SimpleTuner keeps config.json in config/ and names "config/multidatabackend.json" relative to the project root.
    path = write_config(tmp_path)
    moved = tmp_path / "config" / "config.json"
    path.rename(moved)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(moved)
    assert cfg.data_backend_config == (tmp_path / "config/multidatabackend.json").resolve()


def test_eval_dataset_is_held_out_of_training(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    assert [ds.id for ds in cfg.train_datasets] == ["clips"]
    assert cfg.dataset("longcat-video-val").is_i2v


def test_to_dict_is_json_ready_and_writes_the_resolution_back_as_hxw(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path))
    out = json.loads(json.dumps(cfg.to_dict()))
    assert out["validation_resolution"] == "480x832"
    assert out["output_dir"] == str(cfg.output_dir)
    assert out["datasets"][0]["id"] == "clips" and out["bsa_chunk_shape"] == [4, 4, 4]


def test_overrides_win_over_the_file_and_accept_cli_spelling(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path), {"--lora_rank": "16", "validation_guidance": 5})
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.validation_guidance) == (16, 16.0, 5.0)


def test_frames_off_the_vae_stride_name_the_nearest_valid_counts(tmp_path: Path) -> None:
    message = config_error(tmp_path, num_frames=92)
    assert "key 'num_frames' = 92" in message
    assert "(frames - 1) % 4 == 0" in message and "use 89 or 93" in message


def test_validation_frames_follow_the_same_rule(tmp_path: Path) -> None:
    message = config_error(tmp_path, validation_num_video_frames=95)
    assert "key 'validation_num_video_frames' = 95" in message and "use 93 or 97" in message


def test_resolution_not_divisible_by_16_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, validation_resolution="500x832")
    assert "key 'validation_resolution' = '500x832'" in message
    assert "height 500 is not divisible by 16" in message and "use 496 or 512" in message


def test_long_side_off_the_bucket_grid_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, validation_resolution="480x840")
    assert "'480x840'" in message
    assert "the long side 840 is not a multiple of aspect_bucket_alignment 64" in message
    assert "use 832 or 896" in message


def test_validation_resolution_must_be_one_hxw_size(tmp_path: Path) -> None:
    message = config_error(tmp_path, validation_resolution="480x832,720x1280")
    assert "validation_resolution" in message and 'expected a size "HxW"' in message


def test_unknown_key_suggests_the_closest_known_key(tmp_path: Path) -> None:
    message = config_error(tmp_path, lora_rnak=8)
    assert "key 'lora_rnak' = 8: unknown key" in message and "did you mean 'lora_rank'?" in message


def test_known_simpletuner_keys_are_ignored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert {"push_to_hub", "optimizer"} <= KNOWN_IGNORED
    path = write_config(tmp_path, push_to_hub=True, optimizer="adamw_bf16")
    with caplog.at_level(logging.WARNING, logger="longcat_dist.config"):
        load_config(path)
    warnings = [r.getMessage() for r in caplog.records if r.name == "longcat_dist.config"]
    assert len(warnings) == 1 and "optimizer, push_to_hub" in warnings[0]


def test_wrong_type_names_key_value_and_expected_type(tmp_path: Path) -> None:
    message = config_error(tmp_path, lora_rank="8x")
    assert "key 'lora_rank' = '8x'" in message and "expected an integer" in message


def test_numbers_written_as_strings_are_read_like_simpletuners_argparse(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, learning_rate="2e-4", gradient_checkpointing="false"))
    assert cfg.learning_rate == 2e-4 and cfg.gradient_checkpointing is False


@pytest.mark.parametrize("guidance", [0.5, 20.5])
def test_guidance_outside_1_to_20_is_refused(tmp_path: Path, guidance: float) -> None:
    message = config_error(tmp_path, validation_guidance=guidance)
    assert f"key 'validation_guidance' = {guidance}" in message and "must lie in [1.0, 20.0]" in message


def test_guidance_outside_the_good_range_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = load_config(write_config(tmp_path, validation_guidance=1.0))
    assert cfg.validation_guidance == 1.0
    assert any(
        "validation_guidance = 1.0" in r.getMessage() and "3.5-5.0" in r.getMessage() for r in caplog.records
    )


def test_lora_rank_below_one_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, lora_rank=0)
    assert "key 'lora_rank' = 0" in message and "must lie in [1, inf]" in message


@pytest.mark.parametrize("rate", [0, -1e-4])
def test_learning_rate_must_be_positive(tmp_path: Path, rate: float) -> None:
    message = config_error(tmp_path, learning_rate=rate)
    assert "key 'learning_rate'" in message and "must lie in (0, inf]" in message


def test_missing_data_backend_file_names_the_resolved_path(tmp_path: Path) -> None:
    message = config_error(tmp_path, data_backend_config="configs/missing.json")
    assert "key 'data_backend_config' = 'configs/missing.json'" in message
    assert f"file not found (resolved to {(tmp_path / 'configs/missing.json').resolve()})" in message


def test_data_backend_config_is_required(tmp_path: Path) -> None:
    message = config_error(tmp_path, data_backend_config=DROP)
    assert "key 'data_backend_config'" in message and "required key is missing" in message


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "lora_rank": 8,\n  // my comment\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "line 3, column 3" in message and "JSON has no comments" in message


def test_config_must_be_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(path)


@pytest.mark.parametrize("stage", [1, 4])
def test_zero_stage_must_be_2_or_3(tmp_path: Path, stage: int) -> None:
    message = config_error(tmp_path, zero_stage=stage)
    assert f"key 'zero_stage' = {stage}" in message and "expected one of 2, 3" in message


def test_unknown_base_model_precision_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, base_model_precision="fp4")
    assert (
        "key 'base_model_precision' = 'fp4'" in message and "expected one of 'bf16', 'fp8', 'int8'" in message
    )
    assert "'fp8-torchao' (= 'fp8')" in message


def test_a_list_where_a_choice_belongs_is_a_type_error(tmp_path: Path) -> None:
    message = config_error(tmp_path, mixed_precision=["bf16"])
    assert (
        "key 'mixed_precision' = ['bf16']" in message and "expected one of 'bf16', 'fp32', 'auto'" in message
    )


@pytest.mark.parametrize(
    ("written", "read"), [("no_change", "bf16"), ("fp8-torchao", "fp8"), ("int8-quanto", "int8")]
)
def test_simpletuner_precision_aliases_are_mapped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, written: str, read: str
) -> None:
    with caplog.at_level(logging.INFO, logger="longcat_dist.config"):
        cfg = load_config(write_config(tmp_path, base_model_precision=written))
    assert cfg.base_model_precision == read
    assert any(f"base_model_precision '{written}' -> '{read}'" in r.getMessage() for r in caplog.records)


def test_eval_dataset_id_must_name_a_dataset(tmp_path: Path) -> None:
    message = config_error(tmp_path, eval_dataset_id="val")
    assert (
        "key 'eval_dataset_id' = 'val'" in message
        and "no dataset in data_backend_config has this id" in message
    )
    assert "ids: clips, start-frames, longcat-video-val" in message


def test_eval_dataset_must_be_a_video_dataset(tmp_path: Path) -> None:
    message = config_error(tmp_path, eval_dataset_id="start-frames")
    assert "key 'eval_dataset_id' = 'start-frames'" in message and "enabled video dataset" in message


def test_a_checkpoint_directory_is_required_unless_tiny_model(tmp_path: Path) -> None:
    message = config_error(tmp_path, pretrained_model_name_or_path=DROP)
    assert "pretrained_model_name_or_path" in message and "required unless tiny_model is true" in message
    assert load_config(write_config(tmp_path, pretrained_model_name_or_path=DROP, tiny_model=True)).tiny_model


def test_validation_without_datasets_needs_a_prompt_and_start_frame(tmp_path: Path) -> None:
    message = config_error(tmp_path, validation_using_datasets=False)
    assert "key 'validation_prompt'" in message and "needs a prompt and a start frame" in message
    assert load_config(write_config(tmp_path, validation_using_datasets=False, validation_steps=0))


def test_lora_targets_must_name_a_block_linear(tmp_path: Path) -> None:
    message = config_error(tmp_path, lora_targets=["qkv", "to_q"])
    assert "key 'lora_targets' = 'to_q'" in message and "not a Linear of the DiT block" in message
    assert load_config(write_config(tmp_path, lora_targets="qkv, ffn.w1")).lora_targets == ("qkv", "ffn.w1")
    selectable = ["ffn.w1", "ffn.w2", "ffn.w3", "y_embedder"]
    assert load_config(write_config(tmp_path, lora_targets=selectable)).lora_targets == tuple(selectable)


def test_bsa_needs_a_gpu(tmp_path: Path) -> None:
    message = config_error(tmp_path, attention_implementation="bsa", use_gpu=False, validation_num_gpus=0)
    assert "key 'attention_implementation' = 'bsa'" in message and "needs use_gpu" in message


@pytest.mark.parametrize(("frames", "nearest"), [(2, "1 or 5"), (94, "93 or 97"), (96, "93 or 97")])
def test_check_frames_names_the_neighbours(frames: int, nearest: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_frames(frames, "num_frames")
    assert f"key 'num_frames' = {frames}" in str(info.value) and f"use {nearest}" in str(info.value)


def test_check_frames_returns_valid_counts_and_refuses_non_positive() -> None:
    assert [check_frames(f, "k") for f in (1, 5, 93, 121)] == [1, 5, 93, 121]
    with pytest.raises(ConfigError, match="positive integer"):
        check_frames(0, "k")


@pytest.mark.parametrize(("h", "w"), [(480, 832), (832, 480), (720, 1280), (480, 480), (1280, 720)])
def test_check_resolution_accepts_the_standard_buckets(h: int, w: int) -> None:
    check_resolution(h, w, "validation_resolution")


@pytest.mark.parametrize(
    ("h", "w", "rule"),
    [
        (480, 840, "the long side 840 is not a multiple of aspect_bucket_alignment 64"),
        (500, 832, "height 500 is not divisible by 16"),
        (504, 504, "height 504 is not divisible by 16"),
        (832, 488, "width 488 is not divisible by 16"),
        (840, 480, "the long side 840"),
    ],
)
def test_check_resolution_refuses_off_grid_sizes(h: int, w: int, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_resolution(h, w, "validation_resolution")
    assert f"key 'validation_resolution' = '{h}x{w}'" in str(info.value) and rule in str(info.value)


def test_check_resolution_uses_the_given_alignment() -> None:
    check_resolution(480, 848, "k", alignment=16)
    with pytest.raises(ConfigError, match="aspect_bucket_alignment 32"):
        check_resolution(480, 848, "k", alignment=32)


REPO = Path(__file__).resolve().parents[1]


def test_example_configs_load_once_copied_under_their_real_names(tmp_path: Path) -> None:
    # The quickstart workflow: copy both examples next to each other without the .example suffix.
    for name in ("config.json", "multidatabackend.json"):
        (tmp_path / name).write_text((REPO / "configs" / f"{name}.example").read_text())
    cfg = load_config(tmp_path / "config.json")
    assert cfg.eval_dataset_id == "longcat-video-val" and [ds.id for ds in cfg.train_datasets] == ["clips"]
    assert cfg.dataset("clips").conditioning_data == ("start-frames",)
    assert cfg.dataset("clips").cache_dir_vae == tmp_path / "cache/clips"
    assert (cfg.validation_height, cfg.validation_width, cfg.validation_guidance) == (480, 832, 4.0)


def test_cluster_configs_load() -> None:
    cfg = load_config(REPO / "configs/cluster/config.json")
    assert cfg.num_workers >= 1 and cfg.eval_dataset_id in {ds.id for ds in cfg.datasets}
    assert all(ds.is_i2v for ds in cfg.datasets if ds.dataset_type == "video")


def test_simpletuner_layout_paths_get_a_hint_naming_the_file_found(tmp_path: Path) -> None:
    # SimpleTuner reads config/config.json's paths from its root; here they are relative to config/.
    path = write_config(tmp_path)
    (tmp_path / "config" / "config.json").write_text(path.read_text())
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "config" / "config.json")
    message = str(info.value)
    assert "key 'data_backend_config' = 'config/multidatabackend.json'" in message
    assert f"a file exists at {(tmp_path / 'config/multidatabackend.json').resolve()}" in message


def test_config_md_documents_every_key() -> None:
    documented = set(re.findall(r"`([a-z_0-9.]+)`", (REPO / "docs/CONFIG.md").read_text()))
    keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"datasets"}
    keys |= DATASET_KEYS | {f"video.{k}" for k in VIDEO_KEYS - {"is_i2v"}}
    assert sorted(keys - documented) == []


@given(st.integers(min_value=1, max_value=1000))
def test_frames_rule_and_its_hint_as_a_property(frames: int) -> None:
    if (frames - 1) % 4 == 0:
        assert check_frames(frames, "num_frames") == frames
        return
    with pytest.raises(ConfigError) as info:
        check_frames(frames, "num_frames")
    below, above = map(int, re.fullmatch(r"use (\d+) or (\d+)", info.value.hint).groups())
    assert below < frames < above and above - below == 4
    assert check_frames(below, "k") == below and check_frames(above, "k") == above


@given(st.integers(16, 2048), st.integers(16, 2048), st.sampled_from([16, 32, 64, 128]))
def test_bucket_rule_as_a_property(h: int, w: int, alignment: int) -> None:
    expected = h % 16 == 0 and w % 16 == 0 and (h == w or max(h, w) % alignment == 0)
    outcomes = []
    for size in ((h, w), (w, h)):  # the rule does not care about orientation
        try:
            check_resolution(*size, "validation_resolution", alignment)
            outcomes.append(True)
        except ConfigError as err:
            assert f"'{size[0]}x{size[1]}'" in str(err) and "validation_resolution" in str(err)
            outcomes.append(False)
    assert outcomes == [expected, expected]


@given(st.integers(1, 60).map(lambda n: 16 * n), st.integers(1, 40), st.sampled_from([32, 64]))
def test_every_short_side_on_16_with_a_long_side_on_the_grid_is_a_bucket(
    short: int, k: int, alignment: int
) -> None:
    long_side = (short // alignment + k) * alignment  # the k-th grid value above the short side
    check_resolution(short, long_side, "k", alignment)
    check_resolution(long_side, short, "k", alignment)


@given(st.integers(1, 60).map(lambda n: 16 * n), st.integers(17, 2048), st.sampled_from([32, 64]))
def test_long_side_hint_names_grid_values_that_stay_long(short: int, long_side: int, alignment: int) -> None:
    if long_side <= short or long_side % alignment == 0:
        return
    with pytest.raises(ConfigError) as info:
        check_resolution(short, long_side, "k", alignment)
    fits = [int(v) for v in re.findall(r"\d+", info.value.hint)]
    assert fits and all(v % alignment == 0 and v >= short for v in fits)
    for v in fits:
        check_resolution(short, v, "k", alignment)


def test_zero3_refuses_a_quantized_base(tmp_path: Path) -> None:
    message = config_error(tmp_path, zero_stage=3, base_model_precision="fp8-torchao")
    assert "key 'zero_stage' = 3" in message and "fp8 base" in message and "use zero_stage 2" in message
