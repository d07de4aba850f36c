"""Benchmark: block-sparse attention (Triton) vs dense torch SDPA (cuDNN, flash) at LongCat training shapes.

Run on one GPU from the repo root:  PYTHONPATH=. python bench/attention.py --shapes train,704x24,704x52 --out results/
Add --sweep to time every (num_warps, num_stages) candidate of each kernel first and keep the fastest.
TFLOP/s for BSA count only the computed 64x64 tiles (padding rows of partial blocks included); the backward
counts 2.5x the forward FLOPs (5 matmuls), the usual convention, although this kernel pair does 7.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from longcat_dist.kernels import block_sparse_attention, bsa_triton
from longcat_dist.kernels.bsa_select import BlockGrid, select_blocks_on_grid

HEADS, HEAD_DIM, SPARSITY = 32, 128, 0.9375
SHAPES = {  # name: (latent_shape (T, Hp, Wp), num_cond_latents)
    "train": ((24, 30, 52), 1),  # 93 frames at 480x832: 1 cond + 23 noise latent frames
    "704x24": ((24, 44, 80), 1),  # 704x1280, 93 frames
    "704x52": ((52, 44, 80), 4),  # 704x1280, 48 noise + 4 cond latent frames
}
CANDIDATES = [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3)]


def time_ms(fn, budget_ms: float = 1500.0) -> float:
    """Median device time of fn over repeats that fit in about budget_ms, after warm-up."""
    fn()
    torch.cuda.synchronize()
    first = _once(fn)
    times = [_once(fn) for _ in range(max(3, min(50, int(budget_ms / max(first, 1e-3)))))]
    return statistics.median(times)


def _once(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def sweep(q, k, v, grid, selection, do) -> dict[str, tuple[int, int]]:
    """Time each kernel under every launch candidate; set and return the fastest."""
    o, lse = bsa_triton.attention_forward(q, k, v, grid, selection)
    runs = {
        "FWD_LAUNCH": lambda: bsa_triton.attention_forward(q, k, v, grid, selection),
        "DQ_LAUNCH": lambda: bsa_triton.attention_backward(do, q, k, v, o, lse, grid, selection),
        "DKDV_LAUNCH": lambda: bsa_triton.attention_backward(do, q, k, v, o, lse, grid, selection),
    }
    best = {}
    for table, run in runs.items():
        timings = {}
        for cand in CANDIDATES:
            getattr(bsa_triton, table)[HEAD_DIM] = cand
            try:
                timings[cand] = time_ms(run, 500.0)
            except Exception as err:  # a candidate may not fit (shared memory); report and go on
                print(f"  {table} {cand}: failed ({type(err).__name__}: {str(err)[:120]})")
        best[table] = min(timings, key=timings.get)
        getattr(bsa_triton, table)[HEAD_DIM] = best[table]
        print(
            f"sweep {table}: "
            + ", ".join(f"{c}={t:.2f}ms" for c, t in timings.items())
            + f" -> {best[table]}"
        )
    return best


def bench_shape(name: str, do_sweep: bool, dense: bool, data: str) -> dict:
    latent_shape, n_cond = SHAPES[name]
    num_tokens = math.prod(latent_shape)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, HEADS, num_tokens, HEAD_DIM)
    q, k, v, do = (torch.randn(shape, device="cuda", generator=gen) for _ in range(4))
    if data == "smooth":
        field = smooth_field(latent_shape, gen)
        q, k = q * 0.5 + field, k * 0.5 + field
    q, k, v, do = (x.to(torch.bfloat16) for x in (q, k, v, do))
    grid = BlockGrid(latent_shape, n_cond, (4, 4, 4))
    selection = select_blocks_on_grid(q, k, grid, SPARSITY, False)
    pairs = HEADS * selection.counts.sum().item()  # computed (q-block, k-block) tiles
    bsa_fwd_flops = 4.0 * pairs * grid.block_size**2 * HEAD_DIM
    dense_fwd_flops = 4.0 * HEADS * num_tokens**2 * HEAD_DIM
    row = dict(
        shape=name,
        data=data,
        latent_shape=latent_shape,
        tokens=num_tokens,
        blocks=grid.num_blocks,
        pairs=pairs,
    )
    if do_sweep:
        row["launch"] = {k: list(v) for k, v in sweep(q, k, v, grid, selection, do).items()}
    o, lse = bsa_triton.attention_forward(q, k, v, grid, selection)
    row["select_ms"] = time_ms(lambda: select_blocks_on_grid(q, k, grid, SPARSITY, False))
    row["fwd_kernel_ms"] = time_ms(lambda: bsa_triton.attention_forward(q, k, v, grid, selection))
    row["bwd_kernel_ms"] = time_ms(
        lambda: bsa_triton.attention_backward(do, q, k, v, o, lse, grid, selection)
    )
    kw = dict(latent_shape=latent_shape, num_cond_latents=n_cond, sparsity=SPARSITY)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    row["bsa_fwd_ms"] = time_ms(lambda: block_sparse_attention(q, k, v, **kw))
    row["bsa_fwdbwd_ms"] = time_ms(
        lambda: torch.autograd.grad(block_sparse_attention(qg, kg, vg, **kw), (qg, kg, vg), do)
    )
    row["bsa_fwd_tflops"] = bsa_fwd_flops / row["fwd_kernel_ms"] / 1e9
    row["bsa_bwd_tflops"] = 2.5 * bsa_fwd_flops / row["bwd_kernel_ms"] / 1e9
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION) if dense else ():
        label = backend.name.split("_")[0].lower()
        with sdpa_kernel(backend):
            fwd = time_ms(lambda: sdpa(q, k, v), 3000.0)
            fwdbwd = time_ms(lambda: torch.autograd.grad(sdpa(qg, kg, vg), (qg, kg, vg), do), 3000.0)
        row[f"{label}_fwd_ms"], row[f"{label}_fwdbwd_ms"] = fwd, fwdbwd
        row[f"{label}_fwd_tflops"] = dense_fwd_flops / fwd / 1e9
        row[f"{label}_bwd_tflops"] = 2.5 * dense_fwd_flops / (fwdbwd - fwd) / 1e9
        row[f"speedup_fwdbwd_vs_{label}"] = fwdbwd / row["bsa_fwdbwd_ms"]
    return row


def smooth_field(latent_shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """A spatially smooth shared component of q and k, [1, nh, N, hd], so that nearby blocks score alike (closer
    to real video features than white noise: selections cluster, which changes L2 reuse and load balance)."""
    T, Hp, Wp = latent_shape
    coarse = torch.randn(
        1, HEADS * HEAD_DIM, -(-T // 4), -(-Hp // 8), -(-Wp // 8), device="cuda", generator=gen
    )
    field = torch.nn.functional.interpolate(
        coarse, size=latent_shape, mode="trilinear"
    )  # [1, nh*hd, T, Hp, Wp]
    return field.view(1, HEADS, HEAD_DIM, -1).transpose(-1, -2) * 2.0


def print_table(rows: list[dict]) -> None:
    cols = [
        ("shape", "{}"), ("data", "{}"), ("tokens", "{}"), ("pairs", "{}"), ("select_ms", "{:.2f}"), ("fwd_kernel_ms", "{:.2f}"),
        ("bwd_kernel_ms", "{:.2f}"), ("bsa_fwd_ms", "{:.2f}"), ("bsa_fwdbwd_ms", "{:.2f}"),
        ("bsa_fwd_tflops", "{:.0f}"), ("bsa_bwd_tflops", "{:.0f}"), ("cudnn_fwd_ms", "{:.1f}"),
        ("cudnn_fwdbwd_ms", "{:.1f}"), ("cudnn_fwd_tflops", "{:.0f}"), ("cudnn_bwd_tflops", "{:.0f}"),
        ("flash_fwd_ms", "{:.1f}"), ("flash_fwdbwd_ms", "{:.1f}"), ("speedup_fwdbwd_vs_cudnn", "{:.1f}x"),
        ("speedup_fwdbwd_vs_flash", "{:.1f}x"),
    ]  # fmt: skip
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(fmt.format(row[c]) if c in row else "-" for c, fmt in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="train", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--sweep", action="store_true", help="tune launch settings on the first shape")
    parser.add_argument("--no-dense", action="store_true", help="skip the SDPA baselines")
    parser.add_argument("--data", choices=("random", "smooth"), default="random", help="q/k statistics")
    parser.add_argument("--out", type=Path, help="folder for results.json")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", bsa_triton.triton.__version__)
    rows = []
    for i, name in enumerate(args.shapes.split(",")):
        rows.append(bench_shape(name, args.sweep and i == 0, not args.no_dense, args.data))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    print_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"results_{args.data}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
