"""The typed training config: a SimpleTuner-style config.json plus our own keys, validated once up front."""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from longcat_dist.config_data import DatasetConfig, load_data_backends
from longcat_dist.config_rules import check_eval, check_geometry, check_model, check_numbers, check_validation
from longcat_dist.config_values import (
    NO_VALUE,
    ConfigError,
    check_frames,
    check_resolution,
    coerce,
    read_json_file,
    resolve_relative,
    suggest,
)

__all__ = [
    "KNOWN_IGNORED",
    "ConfigError",
    "DatasetConfig",
    "TrainConfig",
    "check_frames",
    "check_resolution",
    "load_config",
    "load_data_backends",
]

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEEPSPEED_CONFIG = PROJECT_ROOT / "configs" / "deepspeed" / "zero2.json"
DEFAULT_LORA_TARGETS = ("qkv", "proj", "q_linear", "kv_linear")

# SimpleTuner keys that longcat-dist accepts and ignores (one warning lists them).
KNOWN_IGNORED = frozenset(
    {
        "push_to_hub", "push_to_hub_background", "push_checkpoints_to_hub", "hub_model_id", "model_card_note",
        "model_card_private", "model_card_safe_for_work", "publishing_config", "webhook_config",
        "webhook_reporting_interval", "tracker_project_name", "tracker_run_name", "tracker_image_layout",
        "optimizer", "optimizer_config", "lr_end", "lr_num_cycles", "lr_power", "lr_scale", "lr_scale_sqrt",
        "attention_mechanism", "sageattention_usage", "fuse_qkv_projections", "musubi_blocks_to_swap",
        "musubi_block_swap_device", "enable_group_offload", "group_offload_type", "group_offload_use_stream",
        "group_offload_blocks_per_group", "group_offload_to_disk_path", "offload_during_startup",
        "offload_during_save", "quantize_via", "quantize_activations", "base_model_default_dtype",
        "text_encoder_1_precision", "text_encoder_2_precision", "lora_type", "lora_format", "lora_init_type",
        "init_lora", "use_dora", "vae_batch_size", "vae_dtype", "vae_cache_ondemand", "vae_cache_disable",
        "vae_cache_scan_behaviour", "vae_enable_tiling", "vae_enable_slicing", "write_batch_size",
        "read_batch_size", "text_encoder_batch_size", "image_processing_batch_size", "max_workers",
        "enable_multiprocessing", "torch_num_threads", "aws_max_pool_connections", "compress_disk_cache",
        "skip_file_discovery", "metadata_update_interval", "delete_unwanted_images", "delete_problematic_images",
        "disable_bucket_pruning", "override_dataset_config", "preserve_data_backend_cache",
        "data_backend_sampling", "dataloader_prefetch", "dataloader_prefetch_qlen", "minimum_image_size",
        "maximum_image_size", "target_downsample_size", "resolution_type", "caption_strategy", "instance_prompt",
        "crop", "crop_style", "crop_aspect", "disable_benchmark", "validation_disable", "validation_on_startup",
        "validation_torch_compile", "validation_noise_scheduler", "validation_guidance_rescale",
        "validation_guidance_real", "validation_disable_unconditional", "validation_prompt_library",
        "user_prompt_library", "validation_randomize", "num_validation_images", "num_eval_images",
        "evaluation_type", "eval_steps_interval", "eval_epoch_interval", "validation_epoch_interval",
        "checkpoint_epoch_interval", "use_ema", "ema_decay", "ema_device", "snr_gamma", "use_soft_min_snr",
        "noise_offset", "noise_offset_probability", "input_perturbation", "flow_sigmoid_scale",
        "flow_use_uniform_schedule", "flow_use_beta_schedule", "flow_beta_schedule_alpha",
        "flow_beta_schedule_beta", "flow_schedule_auto_shift", "training_scheduler_timestep_spacing",
        "inference_scheduler_timestep_spacing", "timestep_bias_strategy", "loss_type", "gradient_precision",
        "grad_clip_method", "set_grads_to_none", "disable_tf32", "allow_tf32", "seed_for_each_device",
        "train_text_encoder", "tokenizer_max_length", "revision", "variant", "pretrained_vae_model_name_or_path",
        "pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder", "local_rank",
        "i_know_what_i_am_doing", "ignore_final_epochs", "allow_dataset_oversubscription", "num_processes",
        "aspect_bucket_rounding", "accelerator_cache_clear_interval", "keep_vae_loaded", "cache_dir",
        "cache_dir_text", "cache_dir_vae", "validation_seed_source", "prediction_type",
    }
)  # fmt: skip
# SimpleTuner's other names for keys we read (mapping logged).
KEY_ALIASES = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
    "optimizer_beta1": "adam_beta1",
    "optimizer_beta2": "adam_beta2",
}
# SimpleTuner spellings of values we support (mapping logged).
VALUE_ALIASES = {
    "base_model_precision": {
        "no_change": "bf16",
        "fp8-torchao": "fp8",
        "int8-quanto": "int8",
        "int8-torchao": "int8",
    },
    "mixed_precision": {"no": "fp32"},
}
TRACKERS_WE_LACK = {"wandb", "comet_ml", "all"}  # SimpleTuner trackers: accepted, TensorBoard used instead


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; build it with load_config, which validates every value."""

    data_backend_config: Path
    datasets: tuple[DatasetConfig, ...]
    # model
    model_family: Literal["longcat_video"] = "longcat_video"
    model_flavour: Literal["final"] = "final"
    model_type: Literal["lora"] = "lora"
    pretrained_model_name_or_path: Path | None = None  # local checkpoint dir; None only with tiny_model
    tiny_model: bool = False
    random_model_depth: int | None = None  # production-width DiT, random weights, this many blocks (benchmarks)
    text_encoder: Literal["umt5", "qwen2.5-vl"] = "umt5"
    base_model_precision: Literal["bf16", "fp8", "int8"] = "bf16"
    attention_implementation: Literal["auto", "sdpa", "bsa", "xformers"] = "auto"
    bsa_sparsity: float = 0.9375
    bsa_chunk_shape: tuple[int, int, int] = (4, 4, 4)
    fused_elementwise: bool = True  # the blocks' fp32 islands as Triton kernels on CUDA (no effect on the CPU)
    # LoRA
    lora_rank: int = 8
    lora_alpha: float | None = None  # load_config sets it to lora_rank when unset
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # optimisation
    learning_rate: float = 1e-4
    lr_scheduler: Literal["constant", "cosine", "constant_with_warmup"] = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 turns clipping off
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    gradient_checkpointing_interval: int = 1
    gradient_checkpointing_save_attention: bool = False  # keep self-attention outputs, dense or BSA (speed for memory)
    gradient_checkpointing_keep_kv_copies: bool = True  # BSA recompute keeps its K/V copies for the backward
    mixed_precision: Literal["bf16", "fp32", "auto"] = "bf16"
    max_train_steps: int | None = None  # None (or 0 in the file): train num_train_epochs epochs
    num_train_epochs: int = 1
    seed: int = 42
    max_nonfinite_steps_in_row: int = 5
    # flow matching
    flow_schedule_shift: float = 12.0
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0
    caption_dropout_probability: float = 0.1
    # data
    resolution: int = 480
    num_frames: int = 93
    aspect_bucket_alignment: int = 64
    shuffle_buffer: int = 64
    dataloader_num_workers: int = 2
    # validation
    validation_resolution: tuple[int, int] = (480, 832)  # (height, width); "480x832" in the file
    validation_num_video_frames: int = 93
    validation_num_inference_steps: int = 40
    validation_guidance: float = 4.0
    validation_negative_prompt: str = ""
    validation_steps: int = 100  # 0 turns validation off
    validation_using_datasets: bool = False
    validation_num_gpus: float = 1.0
    validation_seed: int = 42
    validation_prompt: str | None = None
    validation_start_frame: Path | None = None
    eval_dataset_id: str | None = None
    framerate: int = 15
    # outputs and checkpoints
    output_dir: Path = Path("output")
    logging_dir: Path | None = None  # load_config sets output_dir/logs when unset
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | Path | None = None  # "latest", a checkpoint path, or None
    storage_path: str | None = None  # a local path or a URI (s3://...); load_config sets output_dir/ray
    experiment_name: str = "longcat-lora"
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    logging_steps: int = 10
    # cluster
    num_workers: int = 1
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 4.0
    use_gpu: bool = True
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the job fails
    deepspeed_config: Path = DEFAULT_DEEPSPEED_CONFIG
    zero_stage: Literal[2, 3] = 2

    @property
    def validation_height(self) -> int:
        """Height in pixels of the validation videos."""
        return self.validation_resolution[0]

    @property
    def validation_width(self) -> int:
        """Width in pixels of the validation videos."""
        return self.validation_resolution[1]

    @property
    def train_datasets(self) -> tuple[DatasetConfig, ...]:
        """The enabled video datasets that are trained on (the eval dataset is held out)."""
        return tuple(
            ds
            for ds in self.datasets
            if ds.dataset_type == "video" and not ds.disabled and ds.id != self.eval_dataset_id
        )

    def dataset(self, dataset_id: str) -> DatasetConfig:
        """The dataset with this id (KeyError if none)."""
        for ds in self.datasets:
            if ds.id == dataset_id:
                return ds
        raise KeyError(dataset_id)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: paths as strings, tuples as lists, validation_resolution as "HxW"."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["validation_resolution"] = f"{self.validation_height}x{self.validation_width}"
        return out


def _jsonable(value: Any) -> Any:
    """Turn Paths, tuples and dataclasses into JSON-friendly values."""
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


_HINTS = typing.get_type_hints(TrainConfig)
_FILE_KEYS = frozenset(_HINTS) - {"datasets"}


@dataclass(frozen=True)
class _Entry:
    """One key as the user wrote it: its value, where it came from and the base for relative paths."""

    value: Any
    where: Any
    base: Path


def _gather(raw: dict, where: Any, base: Path, ignored: list[str]) -> dict[str, _Entry]:
    """Normalise keys ('--' prefix, aliases), reject unknown ones and set aside the ignored ones."""
    entries: dict[str, _Entry] = {}
    for written, value in raw.items():
        key = written[2:] if written.startswith("--") else written
        if key in KEY_ALIASES:
            logger.info("%s: reading SimpleTuner key '%s' as '%s'", where, key, KEY_ALIASES[key])
            key = KEY_ALIASES[key]
        if key in KNOWN_IGNORED:
            ignored.append(key)
            continue
        if key not in _FILE_KEYS:
            rule = "unknown key" + (" (datasets come from data_backend_config)" if key == "datasets" else "")
            raise ConfigError(where, written, value, rule, suggest(key, _FILE_KEYS | KNOWN_IGNORED))
        if key in entries:
            raise ConfigError(where, written, value, "this key is given twice (under two spellings)")
        entries[key] = _Entry(value, where, base)
    return entries


def _parse_hw(value: Any, where: Any, key: str) -> tuple[int, int]:
    """Parse "HxW" (or one integer for a square) into (height, width)."""
    match = (
        re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(value)) if not isinstance(value, bool) else None
    )
    if match is None or isinstance(value, float):
        hint = 'write one size as "HEIGHTxWIDTH", e.g. "480x832"; lists of sizes are not supported'
        raise ConfigError(where, key, value, 'expected a size "HxW"', hint)
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def _value(key: str, entry: _Entry, notes: list[str]) -> Any:
    """Convert one user value to its field type, applying value aliases and path resolution."""
    value, where = entry.value, entry.where
    if key == "validation_resolution":
        return _parse_hw(value, where, key)
    aliases = VALUE_ALIASES.get(key, {})
    if isinstance(value, str) and value in aliases:
        notes.append(f"{key} '{value}' -> '{aliases[value]}'")
        value = aliases[value]
    if key == "report_to" and isinstance(value, str):
        trackers = {t.strip() for t in value.split(",")}
        if trackers <= TRACKERS_WE_LACK | {"tensorboard"} and trackers & TRACKERS_WE_LACK:
            notes.append(f"report_to '{value}' -> 'tensorboard' (the only tracker here)")
            value = "tensorboard"
    if key == "resume_from_checkpoint" and value == "latest":
        return value
    if key == "storage_path" and isinstance(value, str) and "://" in value:
        return value  # a URI for pyarrow.fs; never touched as a local path
    if key == "max_train_steps" and value in (0, "0"):
        return None  # SimpleTuner: 0 means "train by epochs"
    hint = Path | None if key in ("resume_from_checkpoint", "storage_path") else _HINTS[key]
    try:
        converted = coerce(value, hint, where, key)
    except ConfigError as err:
        if not aliases:
            raise
        spellings = ", ".join(f"'{a}' (= '{b}')" for a, b in aliases.items())
        raise ConfigError(
            where, key, value, err.rule, f"SimpleTuner spellings also work: {spellings}"
        ) from None
    if isinstance(converted, Path):
        converted = resolve_relative(converted, entry.base)
        return str(converted) if key == "storage_path" else converted
    return converted


def _load_datasets(cfg: dict[str, Any], entry: _Entry | None, where: Path) -> tuple[DatasetConfig, ...]:
    """Load data_backend_config and fill each dataset's unset resolution and frames from the global keys."""
    if entry is None:
        hint = "point it at your multidatabackend.json (a path relative to this config file's directory)"
        raise ConfigError(where, "data_backend_config", NO_VALUE, "required key is missing", hint)
    path = cfg["data_backend_config"]
    if not path.is_file():
        # SimpleTuner resolves against its working directory; we resolve against the config file's directory.
        hint = (f"relative paths are read from the directory of {entry.where}; write the path relative to it "
                "or as an absolute path")  # fmt: skip
        written = Path(str(entry.value)).expanduser()
        elsewhere = [
            base / written for base in (Path.cwd(), where.parent.parent) if (base / written).is_file()
        ]
        if elsewhere and not written.is_absolute():
            hint += f" (a file exists at {elsewhere[0].resolve()}, read from there in SimpleTuner's layout)"
        raise ConfigError(entry.where, "data_backend_config", str(entry.value),
                          f"file not found (resolved to {path})", hint)  # fmt: skip
    datasets = load_data_backends(path)
    filled = []
    for ds in datasets:
        if ds.dataset_type in ("video", "image", "conditioning") and ds.resolution is None:
            ds = dataclasses.replace(ds, resolution=cfg["resolution"])
        if ds.dataset_type == "video" and ds.num_frames is None:
            ds = dataclasses.replace(
                ds, num_frames=cfg["num_frames"], min_frames=ds.min_frames or cfg["num_frames"]
            )
        if ds.dataset_type == "video" and ds.min_frames < ds.num_frames:
            raise ConfigError(path, f"{ds.id}.video.min_frames", ds.min_frames,
                              f"must be >= the frames trained on ({ds.num_frames})")  # fmt: skip
        filled.append(ds)
    return tuple(filled)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read config.json (+ overrides, e.g. from the command line) and its data backends; validate everything."""
    where = Path(path).expanduser().resolve()
    raw = read_json_file(where, "config")
    if not isinstance(raw, dict):
        hint = (
            "config.json is one JSON object; a dataset list belongs in the file named by data_backend_config"
        )
        raise ConfigError(where, "", type(raw).__name__, "expected a JSON object", hint)
    ignored: list[str] = []
    entries = _gather(raw, where, where.parent, ignored)
    # Overrides replace file values; their relative paths are read from the working directory.
    entries.update(_gather(overrides or {}, "overrides", Path.cwd(), ignored))
    notes: list[str] = []
    cfg = {key: _value(key, entry, notes) for key, entry in entries.items()}
    if ignored:
        logger.warning("%s: ignoring SimpleTuner keys that longcat-dist does not use: %s", where,
                       ", ".join(sorted(set(ignored))))  # fmt: skip
    if notes:
        logger.info("%s: reading SimpleTuner values as: %s", where, "; ".join(notes))
    defaults = {
        f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING
    }
    cfg = {**defaults, **cfg}
    output_dir = cfg["output_dir"] if "output_dir" in entries else (where.parent / "output").resolve()
    cfg["output_dir"] = output_dir
    cfg["lora_alpha"] = float(cfg["lora_rank"]) if cfg["lora_alpha"] is None else cfg["lora_alpha"]
    cfg["logging_dir"] = cfg["logging_dir"] or output_dir / "logs"
    cfg["storage_path"] = cfg["storage_path"] or str(output_dir / "ray")
    where_of = lambda key: entries[key].where if key in entries else where
    check_numbers(cfg, where_of)
    check_geometry(cfg, where_of)
    check_model(cfg, where_of)
    check_validation(cfg, where_of)
    ds_config = read_json_file(cfg["deepspeed_config"], "deepspeed_config")
    if not isinstance(ds_config, dict):
        raise ConfigError(cfg["deepspeed_config"], "", type(ds_config).__name__, "expected a JSON object")
    cfg["datasets"] = _load_datasets(cfg, entries.get("data_backend_config"), where)
    check_eval(cfg, cfg["datasets"], where_of)
    return TrainConfig(**cfg)
