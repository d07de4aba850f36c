"""Data-parallel scaling of the real training job: Ray Train + DeepSpeed over 1..N GPUs (or CPU workers with gloo).

    python bench/scaling.py --workers 1,2,4,8 --zero 2,3 --depth 48 --precision fp8      # one multi-GPU host
    python bench/scaling.py --workers 1,2 --equivalence --depth 2 --kill-at 3               # the checks, cheaply
    python bench/scaling.py --cpu --workers 1,2 --steps 2 --warmup 1 --equivalence --kill-at 2   # CPU smoke run

Each row is one `launch.train.run_training` on a local Ray instance: N workers, one GPU each (NCCL), DeepSpeed
ZeRO-2 or -3, batch 1 per worker (weak scaling: the global batch is N), random production-width weights
(`random_model_depth`, or the tiny DiT with --cpu) and synthetic shards shaped like the real ones (--latent), one
one-sample shard per worker so that every epoch is one optimizer step over the same N samples in any layout.
Metrics are rank 0's `metrics.jsonl`, medians over the steps after --warmup: samples/s, seconds per step, the time
the step waited for data, the time in DeepSpeed's collectives (its comms logger, which waits on every collective,
so these runs lose communication/compute overlap; ZeRO-2 here does not overlap anyway) and peak GPU memory.
Efficiency at N = samples/s(N) / (N x samples/s(1)) within one ZeRO stage.

--equivalence also trains 1 worker x N accumulation steps on the same samples and reports the largest difference of
its LoRA from the N-worker one, relative to the largest weight; every row reports whether all ranks ended with
bit-identical LoRA weights (the sha256 each rank records). --kill-at K kills rank 0's process at step K of the
largest ZeRO-2 row (checkpoints every --checkpoint-every steps) and reports the checkpoint the group resumed from.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.train import JOB_NAMESPACE, parse_overrides, run_training  # noqa: E402
from longcat_dist.config import load_config  # noqa: E402
from longcat_dist.data.format import latent_shape  # noqa: E402
from longcat_dist.data.synthetic import write_synthetic_shards  # noqa: E402
from longcat_dist.train.metrics import read_metrics  # noqa: E402
from longcat_dist.train.records import read_worker_records  # noqa: E402
from longcat_dist.train.worker import LORA_NAME  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
TINY_TEXT_DIM, FULL_TEXT_DIM = 32, 4096
TEXT_TOKENS, VALID_TEXT = 512, 120


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="comma list of worker counts (one GPU each)")
    parser.add_argument("--zero", default="2", help="comma list of ZeRO stages (2, 3)")
    parser.add_argument("--depth", type=int, default=48, help="blocks of the random production-width DiT")
    parser.add_argument("--latent", default="24,60,104", help="latent T,H,W of the clips (93x480x832)")
    parser.add_argument("--precision", default="bf16", help="base_model_precision (ZeRO-3 rows use bf16)")
    parser.add_argument("--attention", default="auto", help="attention_implementation")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the medians")
    parser.add_argument("--equivalence", action="store_true", help="compare with 1 worker x N accumulation")
    parser.add_argument("--kill-at", type=int, help="kill rank 0 at this step of the largest ZeRO-2 row")
    parser.add_argument("--checkpoint-every", type=int, default=2, help="checkpointing_steps of the kill row")
    parser.add_argument("--cpu", action="store_true", help="tiny DiT on CPU workers with gloo (smoke run)")
    parser.add_argument("--out", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config keys")
    args = parser.parse_args(argv)
    args.workers = [int(v) for v in args.workers.split(",")]
    args.zero = [int(v) for v in args.zero.split(",")]
    args.latent = tuple(int(v) for v in args.latent.split(","))
    if args.kill_at is not None and not 0 < args.kill_at < args.warmup + args.steps:
        parser.error(f"--kill-at {args.kill_at}: must lie inside the run's {args.warmup + args.steps} steps")
    return args


def pixel_size(latent: tuple[int, int, int]) -> tuple[int, int, int]:
    """The clip size (frames, height, width) whose latents have shape `latent` (VAE: 4x in time, 8x in space)."""
    frames, height, width = (latent[0] - 1) * 4 + 1, latent[1] * 8, latent[2] * 8
    assert latent_shape(frames, height, width)[1:] == latent, latent
    return frames, height, width


def write_shards(root: Path, args: argparse.Namespace) -> tuple[int, int, int]:
    """One one-sample shard per worker of the largest row; returns the clip size."""
    size = pixel_size(args.latent)
    text = dict(text_dim=TINY_TEXT_DIM, max_length=8) if args.cpu else \
        dict(text_dim=FULL_TEXT_DIM, text_tokens=VALID_TEXT, max_length=TEXT_TOKENS)  # fmt: skip
    write_synthetic_shards(root, "bench", {size: [1] * max(args.workers)}, **text)
    return size


def row_config(args, work: Path, shards: Path, size, *, workers: int, zero: int, accumulation: int = 1,
               name: str, **extra):  # fmt: skip
    """The TrainConfig of one run, written as config.json + multidatabackend.json under work/name."""
    directory = work / name
    directory.mkdir(parents=True, exist_ok=True)
    frames, height, width = size
    backends = [
        {"id": "bench", "type": "local", "dataset_type": "video", "instance_data_dir": str(directory / "clips"),
         "caption_strategy": "textfile", "cache_dir_vae": str(shards), "conditioning_data": ["bench-start"],
         "video": {"num_frames": frames, "min_frames": frames, "is_i2v": True}},
        {"id": "bench-start", "type": "local", "dataset_type": "conditioning",
         "instance_data_dir": str(directory / "start")},
    ]  # fmt: skip
    (directory / "multidatabackend.json").write_text(json.dumps(backends))
    ds_config = json.loads((PROJECT / "configs" / "deepspeed" / f"zero{zero}.json").read_text())
    ds_config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    (directory / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    model = {"tiny_model": True} if args.cpu else {"random_model_depth": args.depth}
    precision = args.precision if zero == 2 else "bf16"  # a quantized base is refused under ZeRO-3
    config = {
        "data_backend_config": "multidatabackend.json", **model, "resolution": min(height, width),
        "num_frames": frames, "use_gpu": not args.cpu, "num_workers": workers, "gpus_per_worker": 0 if args.cpu else 1,
        "cpus_per_worker": 1, "zero_stage": zero, "deepspeed_config": str(directory / "deepspeed.json"),
        "base_model_precision": precision, "attention_implementation": args.attention, "train_batch_size": 1,
        "gradient_accumulation_steps": accumulation, "max_train_steps": args.warmup + args.steps,
        "checkpointing_steps": 10**6, "validation_steps": 0, "dataloader_num_workers": 0, "shuffle_buffer": 0,
        "report_to": "none", "output_dir": str(directory / "out"), "storage_path": str(directory / "ray"),
        "experiment_name": name, "aspect_bucket_alignment": 16 if args.cpu else 64, "gradient_checkpointing": True,
        **parse_overrides(args.set), **extra,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return load_config(directory / "config.json")


def summarize(cfg, warmup: int) -> dict:
    """Medians of rank 0's metrics after the warm-up steps, and whether the ranks agree."""
    rows = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if r["step"] > warmup]
    if not rows:
        raise RuntimeError(f"{cfg.output_dir}: no metrics after the {warmup} warm-up steps")

    def median(key: str) -> float:
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else float("nan")

    records = read_worker_records(cfg.output_dir)
    digests = {r.get("final_lora_sha256") for r in records}
    return {
        "samples_per_s": median("samples_per_s"),
        "step_s": median("step_time_s"),
        "data_wait_s": median("data_wait_s"),
        "comm_s": median("comm_s"),
        "peak_gib": max((r.get("peak_memory_gib", float("nan")) for r in rows), default=float("nan")),
        "ranks": len(records),
        "ranks_agree": len(records) == cfg.num_workers and len(digests) == 1 and None not in digests,
        "nodes": len({r["node_id"] for r in records}),
        "start_steps": sorted(r.get("start_step", 0) for r in records),
    }


def lora_difference(a: Path, b: Path) -> float:
    """max |a - b| over the LoRA tensors, relative to the largest |b|."""
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    if left.keys() != right.keys():
        raise RuntimeError(f"{a} and {b} hold different LoRA tensors")
    scale = max(t.abs().max().item() for t in right.values())
    return max((left[k] - right[k]).abs().max().item() for k in left) / max(scale, 1e-30)


def run_rows(args: argparse.Namespace, work: Path) -> list[dict]:
    shards = work / "shards"
    size = write_shards(shards, args)
    results = []
    for zero in args.zero:
        base = None
        for workers in args.workers:
            name = f"zero{zero}-n{workers}"
            cfg = row_config(args, work, shards, size, workers=workers, zero=zero, name=name)
            result = run_training(cfg)
            row = {"zero": zero, "workers": workers, "steps": result.metrics.get("step"), **summarize(cfg, args.warmup)}
            base = row if workers == 1 else base
            row["efficiency"] = row["samples_per_s"] / (workers * base["samples_per_s"]) if base else float("nan")
            if args.equivalence and workers > 1:
                single = row_config(args, work, shards, size, workers=1, zero=zero, accumulation=workers,
                                    name=f"{name}-accum")  # fmt: skip
                run_training(single)
                row["vs_1_worker"] = lora_difference(
                    Path(cfg.output_dir) / LORA_NAME, Path(single.output_dir) / LORA_NAME
                )
            results.append(row)
            print_row(row, flush=True)
    if args.kill_at is not None and 2 in args.zero:
        results.append(kill_row(args, work, shards, size))
        print_row(results[-1], flush=True)
    return results


def kill_row(args, work: Path, shards: Path, size) -> dict:
    """The largest ZeRO-2 row with rank 0 killed once at --kill-at: where it resumed and how it ended."""
    workers = max(args.workers)
    name = f"zero2-n{workers}-kill{args.kill_at}"
    cfg = row_config(args, work, shards, size, workers=workers, zero=2, name=name,
                     checkpointing_steps=args.checkpoint_every, max_failures=1)  # fmt: skip
    knobs = {"fail_once_at_step": args.kill_at, "fail_marker": str(work / name / "killed")}
    result = run_training(cfg, test_knobs=knobs)
    row = {"zero": 2, "workers": workers, "steps": result.metrics.get("step"), **summarize(cfg, args.warmup)}
    row["efficiency"] = float("nan")  # a restart inside the timed steps: not a throughput row
    row["killed_at"] = args.kill_at
    row["resumed_from"] = min(row["start_steps"])
    reference = work / f"zero2-n{workers}" / "out" / LORA_NAME
    if reference.is_file():
        row["vs_uninterrupted"] = lora_difference(Path(cfg.output_dir) / LORA_NAME, reference)
    return row


HEADER = ("ZeRO", "GPUs", "samples/s", "s/step", "eff.", "data s", "comm s", "peak GiB", "ranks =", "vs 1")


def print_header(args: argparse.Namespace) -> None:
    what = "tiny DiT, CPU workers (gloo)" if args.cpu else f"random {args.depth}-block DiT, {args.precision} base"
    print(f"{what}; latent {args.latent}; batch 1 per worker; medians of {args.steps} steps after {args.warmup}")
    print(f"{HEADER[0]:<5}{HEADER[1]:>5}" + "".join(f"{h:>11}" for h in HEADER[2:]))


def print_row(row: dict, flush: bool = False) -> None:
    agree = "yes" if row["ranks_agree"] else "NO"
    cells = [f"{row['samples_per_s']:.3f}", f"{row['step_s']:.3f}", "-" if math.isnan(row["efficiency"]) else f"{row['efficiency']:.1%}",
             f"{row['data_wait_s']:.4f}", f"{row['comm_s']:.4f}", f"{row['peak_gib']:.1f}", agree,
             f"{row['vs_1_worker']:.1e}" if "vs_1_worker" in row else "-"]  # fmt: skip
    print(f"{row['zero']:<5}{row['workers']:>5}" + "".join(f"{c:>11}" for c in cells), flush=flush)
    if "killed_at" in row:
        print(f"  killed rank 0 at step {row['killed_at']}: resumed from step {row['resumed_from']}, ended at step "
              f"{row['steps']}, LoRA vs uninterrupted {row.get('vs_uninterrupted', float('nan')):.1e}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import ray
    import torch  # noqa: F401  (before ray.init; see launch/train.py)

    os.environ.update(NCCL_ENV)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    ray.init(namespace=JOB_NAMESPACE, include_dashboard=False, log_to_driver=False,
             **({"num_cpus": max(args.workers) + 1} if args.cpu else {}))  # fmt: skip
    try:
        print_header(args)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            results = run_rows(args, args.out)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                results = run_rows(args, Path(tmp))
    finally:
        ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
