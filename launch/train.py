"""`python -m launch.train --config configs/<x>.json [--set key=value ...]`: one Ray Train job of LoRA training.

Runs the same on a laptop (a local Ray instance is started) and on a cluster (`ray job submit --working-dir . --
python -m launch.train ...`, see docs/TRAINING.md). Rerunning the same command resumes from the newest checkpoint
under storage_path/experiment_name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from longcat_dist.config import ConfigError, TrainConfig, load_config

logger = logging.getLogger("launch.train")

JOB_NAMESPACE = "longcat-dist"  # the validation actor is looked up in the job's namespace
VALIDATION_FINISH_TIMEOUT_S = 3600.0


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["lr=1e-4", "tiny_model=true"] -> {"lr": 0.0001, "tiny_model": True}; values are JSON, else strings."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set max_train_steps=100")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Resolve the driver-relative paths: workers may run in another working directory."""
    storage = cfg.storage_path
    if storage is not None and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    logging_dir = Path(cfg.logging_dir).resolve() if cfg.logging_dir else None
    return dataclasses.replace(
        cfg, output_dir=Path(cfg.output_dir).resolve(), logging_dir=logging_dir, storage_path=storage
    )


# The CUDA caching allocator's setting for training workers unless the job sets its own: expandable segments let
# freed blocks of different sizes merge, where fixed segments left 16 GiB reserved but unusable (fragmented) in an
# out-of-memory of a 253-frame 480x832 step under a 79 GiB cap (docs/PERFORMANCE.md).
DEFAULT_CUDA_ALLOC_CONF = "expandable_segments:True"


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment variables the training workers start with (read before torch/DeepSpeed initialise)."""
    if not use_gpu:
        # DeepSpeed picks its accelerator from the environment; CPU workers need it set before it is imported.
        return {"DS_ACCELERATOR": "cpu"}
    return {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", DEFAULT_CUDA_ALLOC_CONF)}


def build_trainer(cfg: TrainConfig, *, test_knobs: dict | None = None):
    """The TorchTrainer of one run: scaling, run and failure config from the TrainConfig."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from longcat_dist.train.worker import train_loop_per_worker

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    env = worker_env(cfg.use_gpu)
    resume = None
    if cfg.resume_from_checkpoint not in (None, "latest"):
        resume = ray.train.Checkpoint(str(cfg.resume_from_checkpoint))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, **(test_knobs or {})},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.experiment_name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoints_total_limit),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
        resume_from_checkpoint=resume,
    )


def _start_validation(cfg: TrainConfig):
    try:
        from longcat_dist.validate.actor import start_validation_actor
    except ImportError:
        logger.info("longcat_dist.validate.actor is not available: no validation")
        return None
    return start_validation_actor(cfg)


def _finish_validation(actor, cfg: TrainConfig, final_step: int) -> None:
    """Let the actor validate the final LoRA; its failure is reported, never fatal to the finished training."""
    import ray

    final_lora = Path(cfg.output_dir) / "lora.safetensors"
    try:
        ray.get(actor.finish.remote(final_step, str(final_lora)), timeout=VALIDATION_FINISH_TIMEOUT_S)
    except Exception as err:  # a validation failure must not turn a finished training into a failed job
        logger.error("validation of the final LoRA failed: %s", err)


def check_data_plan(cfg: TrainConfig) -> None:
    """Fail before any worker starts when the shards cannot give every rank a batch.

    In a worker the same error would be retried max_failures times. Shards that the driver cannot read (a path
    that only the worker nodes mount) are left to the workers.
    """
    from longcat_dist.data import stream
    from longcat_dist.train.worker import open_datasets

    try:
        sources = open_datasets(cfg)[0]
    except (FileNotFoundError, OSError) as err:
        logger.warning("the driver cannot read the shards (%s); the workers will check them", err)
        return
    stream.plan_epoch(sources, world_size=cfg.num_workers, num_workers=cfg.dataloader_num_workers,
                      batch_size=cfg.train_batch_size, seed=cfg.seed, epoch=0)  # fmt: skip


def run_training(cfg: TrainConfig, *, test_knobs: dict | None = None):
    """Train on the current Ray cluster (ray.init first) and return Ray's Result."""
    cfg = absolute_paths(cfg)
    check_data_plan(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    actor = _start_validation(cfg)
    if actor is not None:
        actor.submit.remote(0, None)  # the base model before training: the gallery's baseline
    result = build_trainer(cfg, test_knobs=test_knobs).fit()
    from longcat_dist.train.worker import raise_if_stopped

    raise_if_stopped(result.return_value)  # an error that a restart would repeat (e.g. a non-finite loss streak)
    final_step = int((result.metrics or {}).get("step", 0)) if result.metrics else 0
    if actor is not None:
        _finish_validation(actor, cfg, final_step)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m launch.train` (also what the RayJob manifests' entrypoints are checked by)."""
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config.json (quickstart style)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        check_data_plan(absolute_paths(cfg))
    except (ConfigError, ValueError) as err:  # bad config or shards that cannot feed every rank
        print(f"error: {err}", file=sys.stderr)
        return 2
    # torch before ray.init(): loading libtorch_cpu (its MKL) after Ray has started its threads and libraries failed
    # in a `ray job submit` driver on a two-node cluster ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so").
    import ray
    import torch  # noqa: F401

    # Inside `ray job submit` this joins the job's cluster; on a laptop it starts a local instance.
    ray.init(namespace=JOB_NAMESPACE, ignore_reinit_error=True, log_to_driver=args.verbose)
    from longcat_dist.train.engine import NonFiniteLossError

    try:
        result = run_training(cfg)
    except NonFiniteLossError as err:
        print(f"error: training stopped: {err}", file=sys.stderr)
        return 2
    print(f"training finished: {result.metrics}; LoRA in {Path(cfg.output_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
