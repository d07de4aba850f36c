"""One LoRA training step of the production-width DiT on one GPU: seconds per step and peak memory by config.

    python bench/step.py                                  # 93x480x832, depths 2 and 4, all four rows
    python bench/step.py --rows bsa-fp8 --depths 4,8 --steps 5
    python bench/step.py --device cpu --tiny --rows sdpa-bf16 --depths 1,2 --latent 3,8,8   # CPU smoke run

Random weights, built on meta and materialised block by block on the GPU (quantized as it goes for fp8/int8). LoRA
r=8 on the default targets, the real DeepSpeed engine (configs/deepspeed, one process) and the real training step
(longcat_dist.train.step.flow_loss + GuardedStepper) on synthetic batches shaped like the shards (one cond frame,
a 120-token caption). The step is timed at two depths; the per-block cost is their difference,
and the full 48-block model's time is extrapolated as t(48) = t(d1) + (48 - d1)·per_block. Peak memory is printed
only as measured (GiB at the deepest depth run): the allocator's peak at 2 and 4 blocks is too noisy to extrapolate
(a 2-to-4 slope gave 56 GiB for a model measured at 37 GiB). `--depths 48` measures the full model directly. TFLOP/s and the floor use the FLOP count of step_work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# As the training workers run (launch.train.worker_env); read when CUDA's allocator starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_dist.data.stream import Batch  # noqa: E402
from longcat_dist.model.attention import BSAParams  # noqa: E402
from longcat_dist.model.lora import inject_lora  # noqa: E402
from longcat_dist.model.transformer import DiTConfig, LongCatVideoTransformer3DModel  # noqa: E402
from longcat_dist.model.weights import build_random  # noqa: E402
from longcat_dist.train.engine import GuardedStepper, build_engine, deepspeed_config  # noqa: E402
from longcat_dist.train.step import FlowSettings, flow_loss  # noqa: E402

ROWS = {  # name: (attention backend, base precision, ZeRO stage, checkpoint interval, checkpoint saves attention)
    "sdpa-bf16": ("sdpa", "bf16", 2, 1, False),
    "sdpa-bf16-saveattn": ("sdpa", "bf16", 2, 1, True),
    "sdpa-fp8": ("sdpa", "fp8", 2, 1, False),
    "bsa-bf16": ("bsa", "bf16", 2, 1, False),
    "bsa-fp8": ("bsa", "fp8", 2, 1, False),
    "bsa-fp8-saveattn": ("bsa", "fp8", 2, 1, True),
    "bsa-fp8-ckpt2": ("bsa", "fp8", 2, 2, False),
    "bsa-bf16-zero3": ("bsa", "bf16", 3, 1, False),
}
DEFAULT_ROWS = "sdpa-bf16,sdpa-fp8,bsa-bf16,bsa-fp8"
FULL_DEPTH = 48
TEXT_TOKENS, VALID_TEXT = 512, 120
TINY = dict(
    hidden_size=64, num_heads=2, caption_channels=32, adaln_tembed_dim=32, frequency_embedding_size=64
)


def build_model(depth: int, precision: str, device: torch.device, tiny: bool) -> nn.Module:
    """Random-weight DiT materialised one module at a time, quantized on the way when asked."""
    from functools import partial

    from longcat_dist.model.quant import quantize_linear

    transform = None if precision == "bf16" else partial(quantize_linear, precision=precision)
    config = DiTConfig(depth=depth, **(TINY if tiny else {}))
    return build_random(LongCatVideoTransformer3DModel, config, dtype=torch.bfloat16, device=device,
                        linear_transform=transform)  # fmt: skip


def init_process_group(device: torch.device) -> None:
    """A one-process group for DeepSpeed (nccl on GPU, gloo on CPU)."""
    import os

    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def prepare_row(args, name: str, depth: int):
    """The engine of one row at one depth and its step function (step(index) -> loss); see the module docstring."""
    backend, precision, zero_stage, interval, save_attention = ROWS[name]
    device = torch.device(args.device)
    model = build_model(depth, precision, device, args.tiny)
    model.requires_grad_(False)
    inject_lora(model, rank=8, alpha=8, targets=("qkv", "proj", "q_linear", "kv_linear"))
    model.set_attention_backend(backend, BSAParams() if backend == "bsa" else None)
    model.enable_gradient_checkpointing(interval, save_attention=save_attention, keep_kv_copies=args.keep_kv_copies)
    model.set_fused_elementwise(args.fused)
    model.train()
    config = deepspeed_config(
        Path(__file__).resolve().parents[1] / "configs/deepspeed/zero2.json",
        zero_stage=zero_stage, micro_batch_size=1, gradient_accumulation_steps=1, world_size=1,
        max_grad_norm=1.0, learning_rate=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
    )  # fmt: skip
    engine = build_engine(model, config)
    stepper = GuardedStepper(engine, max_nonfinite_in_row=3)
    frames, height, width = args.latent
    text_dim = model.config.caption_channels
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(1, 16, frames, height, width, generator=gen).to(torch.bfloat16)
    texts = [torch.randn(VALID_TEXT, text_dim, generator=gen).to(torch.bfloat16)]
    null = {"bench": torch.zeros(1, text_dim, dtype=torch.bfloat16)}
    settings = FlowSettings(seed=0, shift=12.0, text_length=TEXT_TOKENS)

    def step(index: int) -> float:
        batch = Batch([f"bench/{index}"], "bench", video, video[:, :, :1], texts)
        loss, _ = flow_loss(engine, batch, epoch=0, settings=settings, null_texts=null, device=device)
        stepper(loss, 1e-4)
        return float(loss.detach())

    return engine, step, device


def run_row(args, name: str, depth: int) -> dict:
    engine, step, device = prepare_row(args, name, depth)
    for index in range(args.warmup):
        step(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(args.steps):
        start = time.perf_counter()
        loss = step(args.warmup + index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    engine.destroy()
    return {"depth": depth, "seconds": statistics.median(times), "peak_gib": peak, "loss": loss}


def step_arguments(parser: argparse.ArgumentParser, rows: str, steps: int) -> None:
    """The options of the step, shared with bench/profile_step.py; parse with parse_step_arguments."""
    parser.add_argument("--rows", default=rows, help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--depths", default="2,4", help="one or two depths; per block = their difference")
    parser.add_argument("--latent", default="24,60,104", help="latent T,H,W (93x480x832 -> 24,60,104)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test width (CPU smoke runs)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--bsa-launch", type=Path,
        help="results.json of bench/attention.py --sweep: run the BSA kernels with the launches it picked",
    )  # fmt: skip
    parser.add_argument(
        "--memory-cap-gib", type=float,
        help="cap the allocator at this many GiB (79 = what an 80 GB H100 leaves after the CUDA context), so a "
             "larger GPU answers whether a clip fits a smaller one: a clip that does not fit raises out-of-memory",
    )  # fmt: skip
    parser.add_argument(
        "--keep-kv-copies", action=argparse.BooleanOptionalAction, default=True,
        help="the BSA recompute keeps its K/V copies for the backward (gradient_checkpointing_keep_kv_copies)",
    )  # fmt: skip
    parser.add_argument(
        "--fused", action=argparse.BooleanOptionalAction, default=True,
        help="fused Triton kernels for the fp32 islands, as training runs them (--no-fused: the torch code)",
    )  # fmt: skip


def parse_step_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, list]:
    """(args with latent as a tuple, the depths as ints)."""
    args = parser.parse_args(argv)
    args.latent = tuple(int(v) for v in args.latent.split(","))
    return args, [int(d) for d in args.depths.split(",")]


def apply_bsa_launch(results: Path) -> None:
    """Set the BSA kernels' launch tables (head dim 128) to the ones a bench/attention.py run used."""
    from longcat_dist.kernels import bsa_triton

    launches = json.loads(results.read_text())[0]["launch"]
    for table, values in launches.items():
        getattr(bsa_triton, table)[128] = bsa_triton.Launch(*values)
    print(f"BSA launches from {results}: {launches}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(parser, DEFAULT_ROWS, steps=3)
    args, depths = parse_step_arguments(parser, None)
    init_process_group(torch.device(args.device))
    if args.bsa_launch:
        apply_bsa_launch(args.bsa_launch)
    if args.memory_cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
        print(f"allocator capped at {args.memory_cap_gib} GiB of {total / 2**30:.1f}")
    results = []
    print(f"latent {args.latent}, LoRA r=8, DeepSpeed, batch 1; depths {depths}; 48-block values "
          f"{'measured' if depths == [FULL_DEPTH] else 'extrapolated'}")  # fmt: skip
    header = ("row", "t(d1) s", "t(d2) s", "s/block", "t(48) s", f"GiB(d{depths[-1]})", "TFLOP/s", "floor s", "floor/t")
    print(f"{header[0]:<15}" + "".join(f"{h:>9}" for h in header[1:]))
    for name in args.rows.split(","):
        runs = []
        for depth in depths:
            runs.append(run_row(args, name, depth))
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        if len(runs) == 1:
            a = b = runs[0]
            scale = FULL_DEPTH / a["depth"]
            full, per_block = a["seconds"] * scale, a["seconds"] / a["depth"]
        else:
            a, b = runs
            per_block = (b["seconds"] - a["seconds"]) / (b["depth"] - a["depth"])
            full = a["seconds"] + (FULL_DEPTH - a["depth"]) * per_block
        full_mem = b["peak_gib"] if b["depth"] == FULL_DEPTH else float("nan")  # measured only
        flops, floor = step_work(args.latent, ROWS[name])
        row = {"row": name, "config": dict(zip(("attention", "precision", "zero_stage", "checkpoint_interval", "save_attention"),
               ROWS[name])), "runs": runs, "per_block_s": per_block, "full_s": full, "full_gib": full_mem,
               "full_flops": flops, "floor_s": floor}  # fmt: skip
        results.append(row)
        values = (
            a["seconds"],
            b["seconds"],
            per_block,
            full,
            b["peak_gib"],
            flops / full / 1e12,
            floor,
            floor / full,
        )
        print(f"{name:<15}" + "".join(f"{v:9.3f}" for v in values), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


LINEAR_CEILING = {"bf16": 695e12, "fp8": 1270e12, "int8": 695e12}  # dense matmul TFLOP/s measured on the H100
ATTENTION_CEILING = 575e12  # cuDNN SDPA fwd/bwd mean at 37,440 tokens (docs/PERFORMANCE.md)


def block_work(latent: tuple[int, int, int], row: tuple) -> tuple[float, float]:
    """FLOPs of one block's frozen linears and of its attention in one training step.

    Frozen linears run forward, recompute (checkpointing) and input-gradient: 3x the forward matmuls. Attention
    runs forward, recompute and backward (2.5x): 4.5x; block-sparse computes 1/16 of the blocks.
    """
    backend, _, _, interval, save_attention = row
    c, f = 4096, 11008
    tokens = latent[0] * latent[1] * latent[2] // 4
    recompute = 1.0 if interval == 1 else 1.0 / interval
    linear = 2 * tokens * (6 * c * c + 3 * c * f) * (2 + recompute)
    attention = 4 * tokens * tokens * c * (3.5 + (0.0 if save_attention else recompute))
    return linear, attention / 16 if backend == "bsa" else attention


def step_work(latent: tuple[int, int, int], row: tuple) -> tuple[float, float]:
    """FLOPs of one 48-block production step and its floor in seconds from the measured H100 ceilings."""
    linear, attention = block_work(latent, row)
    floor = linear / LINEAR_CEILING[row[1]] + attention / ATTENTION_CEILING
    return (linear + attention) * FULL_DEPTH, floor * FULL_DEPTH


if __name__ == "__main__":
    main()
