"""Where one training step's time goes: torch profiler over bench/step.py's real step, kernels grouped by kind.

    python bench/profile_step.py --rows bsa-fp8 --depths 2,4 --png docs/step_breakdown.png --json out.json
    python bench/profile_step.py --device cpu --tiny --rows sdpa-bf16 --depths 1,2 --latent 3,8,8   # CPU smoke run

For each depth the step of bench/step.py (same model, LoRA, DeepSpeed engine and batch) runs `--warmup` times, then
`--steps` times under the profiler. Every kernel's own (self) time is put in one category by its name; the per-block
cost of a category is its difference between the two depths. On CUDA the step's wall time minus the kernel time is
"GPU idle": launch gaps, host syncs and Python that the GPU waits for. Prints the table and the top kernels per
block, and writes a stacked-bar PNG of one block's time by category next to the floor of its matmuls and attention.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import (  # noqa: E402
    ATTENTION_CEILING,
    LINEAR_CEILING,
    ROWS,
    block_work,
    init_process_group,
    parse_step_arguments,
    prepare_row,
    step_arguments,
)

# First match wins: the fused and quantize kernels before the generic patterns that their names also contain.
CATEGORIES = (
    ("fused elementwise", r"fused|_modulate_|_gated_add_|_rms_norm_|_rope_kernel"),
    ("fp8/int8 quantize", r"_quantize_rows|_rescale_int32|quantize"),
    (
        "attention",
        r"_fwd_kernel|_dq_kernel|_dkdv_kernel|_pool_kernel|_pack_kernel|_topk_kernel|attn|attention|flash|fmha|cudnn|sdpa|sdp_",
    ),
    (
        "matmul",
        r"gemm|matmul|scaled_mm|_int_mm|cublas|cutlass|nvjet|xmma|sm90_|aten::(?:mm|addmm|bmm|linear)$",
    ),
    ("norm", r"layer_norm|layernorm|rms_norm|rmsnorm|native_layer_norm"),
    ("copy / cast", r"copy|memcpy|memset|aten::to$|aten::cat|convert|clone|contiguous|fill|zero_"),
    ("optimizer", r"adam|multi_tensor|optimizer|foreach"),
    ("communication", r"nccl|all_reduce|allreduce|gloo|broadcast|c10d"),
    (
        "elementwise / reduce",
        r"elementwise|vectorized|reduce|mul|add|silu|sigmoid|exp|sin|cos|pow|rsqrt|mean|sum",
    ),
)
OTHER, IDLE = "other", "GPU idle (host, launches, syncs)"
TOP_KERNELS = 15


def categorize(kernel_name: str) -> str:
    """The category of a kernel or op by its name (case-insensitive), OTHER when nothing matches."""
    lowered = kernel_name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return OTHER


def kernel_times(profiler: torch.profiler.profile, device: torch.device) -> dict[str, float]:
    """Self time in ms of every kernel (CUDA) or op (CPU) over the profiled steps, by name."""
    times: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            micros = event.self_cpu_time_total
        if micros > 0:
            times[event.key] += micros / 1e3
    return dict(times)


def profile_depth(args, name: str, depth: int) -> dict:
    """Profile `args.steps` steps of one row at one depth; ms per step by kernel and the wall time per step."""
    engine, step, device = prepare_row(args, name, depth)
    for index in range(args.warmup):
        step(index)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for index in range(args.steps):
            step(args.warmup + index)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    if args.trace:
        profiler.export_chrome_trace(str(args.trace.with_suffix(f".{name}.d{depth}.json")))
    kernels = {k: v / args.steps for k, v in kernel_times(profiler, device).items()}
    engine.destroy()
    return {"depth": depth, "wall_ms": wall_ms, "kernels_ms": kernels}


def breakdown(runs: list[dict], device: torch.device) -> dict:
    """Per-category ms per step at each depth and per block (the difference); idle time on CUDA."""
    by_depth = []
    for run in runs:
        totals: dict[str, float] = defaultdict(float)
        for kernel, ms in run["kernels_ms"].items():
            totals[categorize(kernel)] += ms
        if device.type == "cuda":
            totals[IDLE] = max(0.0, run["wall_ms"] - sum(totals.values()))
        by_depth.append(dict(totals))
    (a, b), (ra, rb) = (by_depth[0], by_depth[-1]), (runs[0], runs[-1])
    blocks = max(1, rb["depth"] - ra["depth"]) if len(runs) > 1 else ra["depth"]
    names = sorted(set(a) | set(b), key=lambda c: -(b.get(c, 0.0)))
    if len(runs) > 1:
        per_block = {c: (b.get(c, 0.0) - a.get(c, 0.0)) / blocks for c in names}
        kernels = {k: (rb["kernels_ms"].get(k, 0.0) - ra["kernels_ms"].get(k, 0.0)) / blocks
                   for k in set(ra["kernels_ms"]) | set(rb["kernels_ms"])}  # fmt: skip
    else:
        per_block = {c: b.get(c, 0.0) / blocks for c in names}
        kernels = {k: v / blocks for k, v in rb["kernels_ms"].items()}
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return {"by_depth": by_depth, "per_block_ms": per_block, "top_kernels_per_block_ms": top}


def floor_per_block_ms(args, name: str) -> dict[str, float]:
    """One block's matmul and attention time at the measured H100 ceilings (bench/step.py's FLOP count)."""
    linear, attention = block_work(args.latent, ROWS[name])
    return {
        "matmul": linear / LINEAR_CEILING[ROWS[name][1]] * 1e3,
        "attention": attention / ATTENTION_CEILING * 1e3,
    }


def plot(results: list[dict], path: Path) -> None:
    """One horizontal stacked bar per row: a block's measured time by category, and its floor below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = [c for c, _ in CATEGORIES] + [OTHER, IDLE]
    colors = dict(zip(categories, plt.get_cmap("tab20").colors))
    labels, fig_rows = [], []
    for result in results:
        labels += [f"{result['row']} measured", f"{result['row']} floor"]
        fig_rows += [result["per_block_ms"], result["floor_ms"]]
    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.6 * len(fig_rows)))
    for y, values in enumerate(fig_rows):
        left = 0.0
        for category in categories:
            width = max(0.0, values.get(category, 0.0))
            if width > 0:
                ax.barh(y, width, left=left, color=colors[category], label=category)
                left += width
        ax.text(left, y, f" {left:.1f} ms", va="center")
    ax.set_yticks(range(len(fig_rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per DiT block per training step (forward, recompute, backward)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI entry; returns the results (also written with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(parser, "bsa-fp8", steps=2)
    parser.add_argument("--png", type=Path, help="write the per-block breakdown plot here")
    parser.add_argument("--trace", type=Path, help="also write Chrome traces (<trace>.<row>.d<depth>.json)")
    args, depths = parse_step_arguments(parser, argv)
    device = torch.device(args.device)
    init_process_group(device)
    results = []
    for name in args.rows.split(","):
        runs = [profile_depth(args, name, depth) for depth in depths]
        result = {"row": name, "config": ROWS[name], "depths": depths, "wall_ms": [r["wall_ms"] for r in runs],
                  **breakdown(runs, device), "floor_ms": floor_per_block_ms(args, name)}  # fmt: skip
        results.append(result)
        _print(result)
    if args.png:
        plot(results, args.png)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _print(result: dict) -> None:
    depths = result["depths"]
    print(f"\n{result['row']} {result['config']}: wall ms/step " +
          ", ".join(f"d{d} {w:.1f}" for d, w in zip(depths, result["wall_ms"])))  # fmt: skip
    total = sum(result["per_block_ms"].values()) or 1.0
    print(
        f"{'category':<34}" + "".join(f"{f'd{d} ms':>11}" for d in depths) + f"{'ms/block':>11}{'share':>8}"
    )
    for category, per_block in result["per_block_ms"].items():
        at_depths = "".join(f"{totals.get(category, 0.0):11.2f}" for totals in result["by_depth"])
        print(f"{category:<34}{at_depths}{per_block:11.2f}{per_block / total:8.1%}")
    floor = result["floor_ms"]
    print(
        f"floor per block at the ceilings: matmul {floor['matmul']:.1f} ms, attention {floor['attention']:.1f} ms"
    )
    print("top kernels per block (ms):")
    for kernel, ms in result["top_kernels_per_block_ms"]:
        print(f"  {ms:9.3f}  {kernel[:110]}")


if __name__ == "__main__":
    main()
