"""The per-worker training loop that Ray Train runs on every rank: model, engine, stream, step, checkpoint, report."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longcat_dist.config import TrainConfig
from longcat_dist.data import stream
from longcat_dist.model import lora
from longcat_dist.train import checkpoint
from longcat_dist.train import engine as ds
from longcat_dist.train.metrics import LOSS_PLOT_NAME, METRICS_NAME, MetricsLog, plot_loss
from longcat_dist.train.records import lora_digest, record_worker
from longcat_dist.train.step import FlowSettings, flow_loss

logger = logging.getLogger(__name__)

VALIDATION_ACTOR = "longcat-validation"
LORA_NAME = "lora.safetensors"  # PEFT/diffusers keys
OFFICIAL_LORA_NAME = "lora_official.safetensors"  # LongCat-Video's own format (spec §7)
LORAS_DIR = "loras"  # <output_dir>/loras/step-NNNNNNN/: the LoRAs handed to validation
STOPPED_KEY = "stopped"  # the error message in the return value of a run that the workers stopped


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The DiT (tiny random, production-width random, or pretrained; quantized when asked) with LoRA; base frozen,
    LoRA fp32."""
    from longcat_dist.model.attention import BSAParams
    from longcat_dist.model.transformer import TINY_DIT, DiTConfig, LongCatVideoTransformer3DModel

    # bf16 base on GPU; on CPU fp32, since the CPU bf16 kernels are slow and DeepSpeed runs fp32 there.
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.mixed_precision != "fp32" else torch.float32
    transform = None
    if cfg.base_model_precision != "bf16":
        from longcat_dist.model.quant import check_zero_stage, quantize_linear

        check_zero_stage(cfg.base_model_precision, cfg.zero_stage)
        transform = partial(quantize_linear, precision=cfg.base_model_precision)
    if cfg.tiny_model:
        torch.manual_seed(cfg.seed)  # the same random base on every rank and every restart
        model = LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT)).to(device, dtype)
        if transform is not None:
            from longcat_dist.model.quant import quantize_model

            model = quantize_model(model, cfg.base_model_precision)
    elif cfg.random_model_depth is not None:
        from longcat_dist.model.weights import build_random

        model = build_random(LongCatVideoTransformer3DModel, DiTConfig(depth=cfg.random_model_depth), dtype=dtype,
                             device=device, seed=cfg.seed, linear_transform=transform)  # fmt: skip
    else:
        model = LongCatVideoTransformer3DModel.from_pretrained(
            cfg.pretrained_model_name_or_path, dtype=dtype, device=device, linear_transform=transform
        )
    model.set_attention_backend(
        cfg.attention_implementation, BSAParams(cfg.bsa_sparsity, tuple(cfg.bsa_chunk_shape))
    )
    model.set_fused_elementwise(cfg.fused_elementwise)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(
            cfg.gradient_checkpointing_interval,
            save_attention=cfg.gradient_checkpointing_save_attention,
            keep_kv_copies=cfg.gradient_checkpointing_keep_kv_copies,
        )
    torch.manual_seed(cfg.seed + 1)  # LoRA A init: identical on every rank
    lora.inject_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                     dropout=cfg.lora_dropout)  # fmt: skip
    return model.train()


def open_datasets(cfg: TrainConfig) -> tuple[list[stream.ShardSource], stream.ShardDecoder, dict, int]:
    """Shard sources, the decoder, the empty-prompt embedding of every dataset and the text pad length."""
    sources, manifests, null_texts = [], [], {}
    for ds_cfg in cfg.train_datasets:
        root = str(ds_cfg.cache_dir_vae)
        manifest = stream.read_manifest(root)
        manifests.append(manifest)
        sources += stream.dataset_sources(root, manifest)
        null_texts[manifest.dataset_id] = stream.read_null_text(root)
    if not sources:
        raise ValueError("no training dataset with shards: set cache_dir_vae on a video dataset")
    text_length = max(int(m.text_encoder["max_length"]) for m in manifests)
    return sources, stream.ShardDecoder(manifests), null_texts, text_length


def engine_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the TrainConfig."""
    return ds.deepspeed_config(
        cfg.deepspeed_config, zero_stage=cfg.zero_stage, micro_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, world_size=world_size,
        max_grad_norm=cfg.max_grad_norm, learning_rate=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay,
    )  # fmt: skip


def total_optimizer_steps(cfg: TrainConfig, micro_steps_per_epoch: int) -> int:
    """max_train_steps when set, else the optimizer steps of num_train_epochs epochs."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    return max(1, cfg.num_train_epochs * micro_steps_per_epoch // cfg.gradient_accumulation_steps)


@dataclass
class RunState:
    """Counters that survive a restart (saved as JSON in every checkpoint)."""

    global_step: int = 0
    optimizer_steps: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_total: int = 0
    layout: dict[str, int] = field(default_factory=dict)  # world_size, num_workers, batch_size, seed

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def _resume(engine, model: nn.Module, layout: dict[str, int]) -> RunState:
    """The run state from Ray's latest checkpoint (restored into the engine), or a fresh one."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return RunState(layout=layout)
    with ckpt.as_directory() as directory:
        meta = checkpoint.restore_train_state(engine, model, directory)
    state = RunState(**meta["run"])
    if state.layout != layout:
        # The data plan depends on the layout: the old position means nothing in the new plan.
        logger.warning("data layout changed %s -> %s: epoch %d restarts from its first step",
                       state.layout, layout, state.epoch)  # fmt: skip
        state.step_in_epoch, state.layout = 0, layout
    logger.info(
        "resumed at step %d (epoch %d, micro-step %d)", state.global_step, state.epoch, state.step_in_epoch
    )
    return state


def _save(engine, model: nn.Module, state: RunState, rank: int, metrics: dict) -> None:
    """Gather the state on every rank; rank 0 writes it and hands it to Ray, the others report metrics only."""
    import ray.train

    tensors = checkpoint.gather_train_state(engine, model)
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "state"
        meta = {"run": state.to_json(), "optimizer_steps": checkpoint.optimizer_step_count(engine)}
        checkpoint.save_train_state(directory, tensors, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=f"checkpoint-{state.global_step:07d}")  # fmt: skip
    # The report only queues the checkpoint; Ray's controller collects it at its next poll (every ~2 s). A worker
    # that died before then would take it along, and the restart would start from the one before (or step 0).
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _export(model: nn.Module, cfg: TrainConfig, directory: Path, step: int, rank: int) -> Path:
    """Write the LoRA in both formats (a collective under ZeRO-3, which must gather the weights)."""
    from deepspeed.runtime.zero import GatheredParameters

    params = [p for p in model.parameters() if p.requires_grad]
    with GatheredParameters(params, modifier_rank=None):
        if directory == Path(cfg.output_dir):  # the final export: every rank records what it ends with
            record_worker(
                cfg.output_dir, rank, dist_world_size(), final_step=step, final_lora_sha256=lora_digest(model)
            )
        if rank == 0:
            base = str(cfg.pretrained_model_name_or_path or random_base_name(cfg))
            meta = {"base_model": base, "step": step}
            lora.export_lora(model, directory / LORA_NAME, metadata=meta)
            lora.export_official_lora(model, directory / OFFICIAL_LORA_NAME, metadata=meta)
    return directory / LORA_NAME


def random_base_name(cfg: TrainConfig) -> str:
    """The base_model of a LoRA trained on a random DiT."""
    if cfg.random_model_depth is not None:
        return f"random-dit-{cfg.random_model_depth}-blocks-seed-{cfg.seed}"
    return "tiny-random-dit"


@cache
def _validation_actor(namespace: str):
    """The job's validation actor, or None when validation is off; looked up once (a lookup blocks rank 0 for a
    round trip to Ray's control store), and the handle stays valid across the actor's restarts."""
    import ray

    try:
        return ray.get_actor(VALIDATION_ACTOR, namespace=namespace)
    except ValueError:
        return None


def _submit_validation(path: Path, step: int) -> None:
    """Hand a LoRA to the validation actor, if the job runs one; never waits for it."""
    import ray

    actor = _validation_actor(ray.get_runtime_context().namespace)
    if actor is not None:
        actor.submit.remote(step, str(path))


def dist_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


class _Window:
    """Loss and timing of the micro-steps of one optimizer step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples = self.tokens = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()
        self.comm_start = ds.comm_seconds()


def _step_metrics(window: _Window, outcome: ds.StepOutcome, lr: float, world_size: int, device) -> dict:
    """Metrics of one optimizer step; the loss is averaged over all ranks."""
    import torch.distributed as dist

    loss = torch.tensor([sum(window.losses) / max(1, len(window.losses))], device=device)
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= world_size
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    comm = ds.comm_seconds()
    extra = {} if comm is None or window.comm_start is None else {"comm_s": comm - window.comm_start}
    if device.type == "cuda":
        extra["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return {
        **extra,
        "loss": float(loss.item()),
        "lr": lr,
        "grad_norm": outcome.grad_norm if outcome.grad_norm is not None else float("nan"),
        "samples_per_s": window.samples * world_size / elapsed,
        "tokens_per_s": window.tokens * world_size / elapsed,
        "data_wait_s": window.data_wait,
        "step_time_s": elapsed,
    }


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Ray Train entry: {"cfg": TrainConfig, "fail_once_at_step": int | None, "fail_marker": path} (tests).

    Returns None, or {STOPPED_KEY: message} when the run stopped on an error that a restart would only repeat.
    """
    import ray.train

    cfg: TrainConfig = loop_config["cfg"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = _device(cfg)
    sources, decoder, null_texts, text_length = open_datasets(cfg)
    model = build_model(cfg, device)
    engine = ds.build_engine(model, engine_config(cfg, world_size))
    loader_workers = cfg.dataloader_num_workers
    layout = {"world_size": world_size, "num_workers": loader_workers, "batch_size": cfg.train_batch_size,
              "seed": cfg.seed}  # fmt: skip
    state = _resume(engine, model, layout)
    from longcat_dist.model.quant import QuantizedLinear

    quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    record_worker(cfg.output_dir, rank, world_size, start_step=state.global_step,
                  base_model_precision=cfg.base_model_precision, quantized_linears=quantized)  # fmt: skip
    stepper = ds.GuardedStepper(engine, cfg.max_nonfinite_steps_in_row)
    settings = FlowSettings(cfg.seed, cfg.flow_schedule_shift, cfg.timestep_sampling, cfg.timestep_logit_mean,
                            cfg.timestep_logit_std, cfg.caption_dropout_probability, text_length)  # fmt: skip
    log = None
    if rank == 0:
        tb_dir = cfg.logging_dir if cfg.report_to == "tensorboard" else None
        log = MetricsLog(cfg.output_dir, tb_dir)
    first = stream.plan_epoch(sources, world_size=world_size, num_workers=loader_workers,
                              batch_size=cfg.train_batch_size, seed=cfg.seed, epoch=0)  # fmt: skip
    total = total_optimizer_steps(cfg, first.steps_per_rank)
    window = _Window()
    while state.global_step < total:
        plan, batches = stream.rank_batches(
            sources, rank=rank, world_size=world_size, num_workers=loader_workers, batch_size=cfg.train_batch_size,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, epoch=state.epoch, start_step=state.step_in_epoch,
            decode=decoder,
        )  # fmt: skip
        if rank == 0 and state.step_in_epoch == 0 and plan.dropped_samples:
            logger.info(
                "epoch %d: %d samples dropped (incomplete batches)", state.epoch, plan.dropped_samples
            )
        fetch_start = time.perf_counter()
        for batch in batches:
            window.data_wait += time.perf_counter() - fetch_start
            loss, tokens = flow_loss(engine, batch, epoch=state.epoch, settings=settings, null_texts=null_texts,
                                     device=device)  # fmt: skip
            lr = ds.lr_at(state.global_step, base_lr=cfg.learning_rate, scheduler=cfg.lr_scheduler,
                          warmup_steps=cfg.lr_warmup_steps, total_steps=total)  # fmt: skip
            try:
                outcome = stepper(loss, lr)
            except ds.NonFiniteLossError as err:
                return _stop(cfg, state, rank, world_size, log, str(err))
            state.step_in_epoch += 1
            if outcome.skipped:
                state.nonfinite_total += 1
            else:
                window.losses.append(float(loss.item()))
                window.samples += len(batch.keys)
                window.tokens += tokens
            if outcome.stepped:
                state.global_step += 1
                _after_step(
                    cfg, engine, model, state, window, outcome, lr, rank, world_size, device, log, total
                )
                failure_injection(loop_config, state.global_step)
                window = _Window()
                if state.global_step >= total:
                    break
            fetch_start = time.perf_counter()
        else:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
    _finish(cfg, model, state, rank, log)


def _after_step(cfg, engine, model, state, window, outcome, lr, rank, world_size, device, log, total) -> None:
    """Log the step; report it to Ray (with a checkpoint every checkpointing_steps); hand LoRAs to validation."""
    import ray.train

    metrics = {**_step_metrics(window, outcome, lr, world_size, device), "step": state.global_step, "epoch": state.epoch,
               "nonfinite_total": state.nonfinite_total}  # fmt: skip
    if log is not None:
        log.log(state.global_step, metrics)
        if state.global_step % max(1, cfg.logging_steps) == 0:
            logger.info("step %d/%d loss %.4f lr %.2e", state.global_step, total, metrics["loss"], lr)
    if state.global_step % max(1, cfg.checkpointing_steps) == 0 or state.global_step >= total:
        _save(engine, model, state, rank, metrics)
    elif state.global_step % max(1, cfg.logging_steps) == 0:
        # A report costs a round trip to Ray's controller (~0.5 s on a laptop), so Ray gets every logging_steps-th
        # step; metrics.jsonl and TensorBoard get every step.
        ray.train.report(metrics)
    if cfg.validation_steps and state.global_step % cfg.validation_steps == 0 and state.global_step < total:
        directory = Path(cfg.output_dir) / LORAS_DIR / f"step-{state.global_step:07d}"
        path = _export(model, cfg, directory, state.global_step, rank)
        if rank == 0:
            _submit_validation(path, state.global_step)


def _finish(cfg: TrainConfig, model: nn.Module, state: RunState, rank: int, log: MetricsLog | None) -> None:
    """Final LoRA files in output_dir (both formats), loss.png from the metrics."""
    path = _export(model, cfg, Path(cfg.output_dir), state.global_step, rank)
    if log is None:
        return
    log.close()
    metrics = Path(cfg.output_dir) / METRICS_NAME
    if metrics.is_file():
        plot_loss(metrics, Path(cfg.output_dir) / LOSS_PLOT_NAME)
    logger.info("done: %d steps, LoRA at %s, %d non-finite micro-steps skipped", state.global_step, path,
                state.nonfinite_total)  # fmt: skip


def _stop(cfg: TrainConfig, state: RunState, rank: int, world_size: int, log: MetricsLog | None,
          message: str) -> dict:  # fmt: skip
    """End the run on an error that a restart would repeat: record it and return it instead of raising it.

    Ray Train retries every worker error max_failures times from the last checkpoint, which would only replay the
    same non-finite streak; a normal return ends the run at once, and the driver raises the message
    (raise_if_stopped). Every rank gets here at the same micro-step: the finite check is an all-reduce.
    """
    logger.error("step %d: %s", state.global_step, message)
    record_worker(cfg.output_dir, rank, world_size, stopped=message, stopped_at_step=state.global_step)
    if log is not None:
        log.close()
    return {STOPPED_KEY: message, "step": state.global_step}


def raise_if_stopped(return_value: Any) -> None:
    """On the driver: raise the error that the workers stopped the run with (Result.return_value), if any."""
    if isinstance(return_value, dict) and return_value.get(STOPPED_KEY):
        raise ds.NonFiniteLossError(return_value[STOPPED_KEY])


def failure_injection(loop_config: dict, step: int) -> None:
    """Test-only: kill this worker process once at a given step, to exercise restarts."""
    at, marker = loop_config.get("fail_once_at_step"), loop_config.get("fail_marker")
    if at is None or step != at or marker is None or Path(marker).exists():
        return
    Path(marker).write_text(str(step))
    logger.warning("fail_once_at_step=%d: this worker exits now (test knob)", step)
    os._exit(1)
