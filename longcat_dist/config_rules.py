"""Rules across the keys of config.json (ranges, geometry, model and validation combinations)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from longcat_dist.config_data import DatasetConfig
from longcat_dist.config_values import ConfigError, check_frames, check_range, check_resolution

logger = logging.getLogger(__name__)

# Every Linear inside a DiT block (spec §2.2); a LoRA target must name one of them or a dotted suffix of one.
BLOCK_LINEARS = (
    "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
    "ffn.w1", "ffn.w2", "ffn.w3", "adaLN_modulation.1",
)  # fmt: skip
CAPTION_PROJECTION = "y_embedder"  # the caption MLP before the blocks; LoRA may target it too
GUIDANCE_LIMITS = (1.0, 20.0)
GUIDANCE_GOOD = (3.5, 5.0)
PRODUCTION_DEPTH = 48  # blocks of the 13.6 B DiT


def check_numbers(cfg: dict[str, Any], where_of: Callable[[str], Any]) -> None:
    """Range rules of single values."""
    at_least = {
        "train_batch_size": 1, "gradient_accumulation_steps": 1, "gradient_checkpointing_interval": 1,
        "lora_rank": 1, "lr_warmup_steps": 0, "max_grad_norm": 0, "max_train_steps": 1, "num_train_epochs": 0,
        "max_nonfinite_steps_in_row": 1, "shuffle_buffer": 0, "dataloader_num_workers": 0,
        "validation_num_inference_steps": 1, "validation_steps": 0, "validation_num_gpus": 0,
        "checkpointing_steps": 1, "checkpoints_total_limit": 1, "num_workers": 1, "gpus_per_worker": 0,
        "logging_steps": 1, "adam_weight_decay": 0, "framerate": 1, "max_failures": 0,
    }  # fmt: skip
    for key, low in at_least.items():
        if cfg[key] is not None:
            check_range(where_of(key), key, cfg[key], lo=low)
    above_zero = ("learning_rate", "lora_alpha", "flow_schedule_shift", "timestep_logit_std", "adam_epsilon",
                  "cpus_per_worker")  # fmt: skip
    for key in above_zero:
        check_range(where_of(key), key, cfg[key], lo=0, lo_open=True)
    for key in ("lora_dropout", "adam_beta1", "adam_beta2"):
        check_range(where_of(key), key, cfg[key], lo=0, hi=1, hi_open=True)
    check_range(where_of("bsa_sparsity"), "bsa_sparsity", cfg["bsa_sparsity"], lo=0, hi=1, hi_open=True)
    check_range(where_of("caption_dropout_probability"), "caption_dropout_probability",
                cfg["caption_dropout_probability"], lo=0, hi=1)  # fmt: skip
    for key in ("seed", "validation_seed"):
        check_range(where_of(key), key, cfg[key], lo=0, hi=2**32 - 1)
    if min(cfg["bsa_chunk_shape"]) < 1:
        raise ConfigError(where_of("bsa_chunk_shape"), "bsa_chunk_shape", list(cfg["bsa_chunk_shape"]),
                          "every chunk side must be >= 1")  # fmt: skip
    if cfg["max_train_steps"] is None and cfg["num_train_epochs"] == 0:
        hint = "set max_train_steps or num_train_epochs to a positive number"
        raise ConfigError(where_of("num_train_epochs"), "num_train_epochs", 0, "nothing to train", hint)


def check_geometry(cfg: dict[str, Any], where_of: Callable[[str], Any]) -> None:
    """Frame counts, bucket grid and resolutions."""
    alignment = cfg["aspect_bucket_alignment"]
    if alignment < 16 or alignment % 16:
        raise ConfigError(where_of("aspect_bucket_alignment"), "aspect_bucket_alignment", alignment,
                          "must be a positive multiple of 16", "64 is the LongCat default")  # fmt: skip
    check_frames(cfg["num_frames"], "num_frames", where_of("num_frames"))
    check_frames(cfg["validation_num_video_frames"], "validation_num_video_frames",
                 where_of("validation_num_video_frames"))  # fmt: skip
    height, width = cfg["validation_resolution"]
    check_resolution(height, width, "validation_resolution", alignment, where_of("validation_resolution"))
    resolution = cfg["resolution"]
    check_resolution(resolution, resolution, "resolution", alignment, where_of("resolution"))


def check_model(cfg: dict[str, Any], where_of: Callable[[str], Any]) -> None:
    """Model, LoRA and hardware combinations."""
    depth = cfg["random_model_depth"]
    if depth is not None:
        check_range(where_of("random_model_depth"), "random_model_depth", depth, lo=1, hi=PRODUCTION_DEPTH)
        if cfg["tiny_model"]:
            raise ConfigError(where_of("random_model_depth"), "random_model_depth", depth,
                              "cannot be combined with tiny_model: true", "keep one of them")  # fmt: skip
    if cfg["pretrained_model_name_or_path"] is None and not cfg["tiny_model"] and depth is None:
        hint = "point it at a local copy of the LongCat-Video checkpoint (dit/, vae/, ...), or set tiny_model"
        raise ConfigError(where_of("pretrained_model_name_or_path"), "pretrained_model_name_or_path", None,
                          "required unless tiny_model is true or random_model_depth is set", hint)  # fmt: skip
    targets = cfg["lora_targets"]
    for target in targets:
        if target != CAPTION_PROJECTION and not any(
            name == target or name.endswith("." + target) for name in BLOCK_LINEARS
        ):
            rule = "not a Linear of the DiT block nor the caption projection"
            hint = f"use {', '.join(BLOCK_LINEARS)} or {CAPTION_PROJECTION}"
            raise ConfigError(where_of("lora_targets"), "lora_targets", target, rule, hint)
    if not targets:
        raise ConfigError(where_of("lora_targets"), "lora_targets", [], "needs at least one target")
    if not cfg["use_gpu"] and cfg["attention_implementation"] == "bsa":
        raise ConfigError(where_of("attention_implementation"), "attention_implementation", "bsa",
                          "block-sparse attention is a CUDA Triton kernel and needs use_gpu", "use sdpa")  # fmt: skip
    if not cfg["use_gpu"] and cfg["validation_num_gpus"] > 0 and cfg["validation_steps"] > 0:
        raise ConfigError(where_of("validation_num_gpus"), "validation_num_gpus", cfg["validation_num_gpus"],
                          "use_gpu is false, so no GPU will be there for the validation actor", "set it to 0")  # fmt: skip
    if cfg["zero_stage"] == 3 and cfg["base_model_precision"] != "bf16":
        # The quantized base lives in buffers that ZeRO-3 cannot partition or gather (model/quant.py).
        raise ConfigError(where_of("zero_stage"), "zero_stage", 3,
                          f"cannot train a {cfg['base_model_precision']} base (quantized weights are buffers "
                          "ZeRO-3 does not partition)", "use zero_stage 2, or base_model_precision bf16")  # fmt: skip
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg["experiment_name"]):
        raise ConfigError(where_of("experiment_name"), "experiment_name", cfg["experiment_name"],
                          "names a directory: use letters, digits, '.', '_' and '-'")  # fmt: skip
    if cfg["lr_warmup_steps"] and cfg["lr_scheduler"] == "constant":
        logger.warning("lr_warmup_steps = %d has no effect with lr_scheduler 'constant'; use "
                       "'constant_with_warmup'", cfg["lr_warmup_steps"])  # fmt: skip


def check_validation(cfg: dict[str, Any], where_of: Callable[[str], Any]) -> None:
    """Guidance range and what validation needs when it is on."""
    guidance = cfg["validation_guidance"]
    low, high = GUIDANCE_LIMITS
    check_range(where_of("validation_guidance"), "validation_guidance", guidance, lo=low, hi=high)
    if not GUIDANCE_GOOD[0] <= guidance <= GUIDANCE_GOOD[1]:
        logger.warning("validation_guidance = %s is outside the range that works well for LongCat-Video I2V "
                       "(%s-%s)", guidance, *GUIDANCE_GOOD)  # fmt: skip
    if cfg["validation_steps"] == 0:
        return
    if cfg["validation_using_datasets"]:
        if cfg["eval_dataset_id"] is None:
            raise ConfigError(where_of("eval_dataset_id"), "eval_dataset_id", None,
                              "validation_using_datasets needs the id of the held-out I2V dataset")  # fmt: skip
        return
    for key in ("validation_prompt", "validation_start_frame"):
        if cfg[key] is None:
            hint = "set validation_using_datasets with eval_dataset_id, or validation_steps to 0"
            raise ConfigError(
                where_of(key), key, None, "validation without datasets needs a prompt and a start frame", hint
            )
    start_frame = cfg["validation_start_frame"]
    if not start_frame.is_file():
        raise ConfigError(where_of("validation_start_frame"), "validation_start_frame", str(start_frame),
                          "file not found")  # fmt: skip


def check_eval(
    cfg: dict[str, Any], datasets: tuple[DatasetConfig, ...], where_of: Callable[[str], Any]
) -> None:
    """eval_dataset_id names an enabled I2V video dataset, and something else is left to train on."""
    eval_id = cfg["eval_dataset_id"]
    ids = [ds.id for ds in datasets]
    if eval_id is not None:
        if eval_id not in ids:
            raise ConfigError(where_of("eval_dataset_id"), "eval_dataset_id", eval_id,
                              "no dataset in data_backend_config has this id", f"ids: {', '.join(ids)}")  # fmt: skip
        target = datasets[ids.index(eval_id)]
        if target.dataset_type != "video" or target.disabled:
            raise ConfigError(where_of("eval_dataset_id"), "eval_dataset_id", eval_id,
                              "must name an enabled video dataset (with is_i2v and its start frames)")  # fmt: skip
    if not any(ds.dataset_type == "video" and not ds.disabled and ds.id != eval_id for ds in datasets):
        raise ConfigError(where_of("eval_dataset_id"), "eval_dataset_id", eval_id,
                          "every enabled video dataset is the eval dataset; nothing is left to train on")  # fmt: skip
