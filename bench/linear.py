"""Frozen linears at LongCat shapes: forward + input gradient, bf16 vs our fp8 / int8 vs torchao's float8 training.

    python bench/linear.py --parts            # one GPU, 37,440 tokens (93 x 480 x 832 latents), our variants
    python bench/linear.py --variants fp8,torchao-tensorwise,torchao-rowwise   # against torchao float8
    python bench/linear.py --tokens 2048 --shrink 16 --reps 5   # CPU smoke run at 1/16 of the widths

Every timed call draws the next of several fresh random input / gradient sets; times are medians (device events on
CUDA). Errors are ||out - ref|| / ||ref|| against an fp32 matmul of the same bf16 inputs and weights.
"""

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_dist.model import quant_autograd as qa  # noqa: E402
from longcat_dist.model import quant_kernels as qk  # noqa: E402
from longcat_dist.model.quant import Fp8Linear, Int8Linear  # noqa: E402

# (in, out, bias) of the DiT's block Linears; q_linear and cross_attn.proj have the proj shape, w3 the w1 shape.
SHAPES = {
    "qkv": (4096, 12288, True),
    "proj": (4096, 4096, True),
    "ffn_w1": (4096, 11008, False),
    "ffn_w2": (11008, 4096, False),
}
# Linears of one block that run on all video tokens (kv_linear sees only the text tokens).
BLOCK_COUNTS = {"qkv": 1, "proj": 3, "ffn_w1": 2, "ffn_w2": 1}
INPUT_SETS = 3


def median_ms(fn, reps: int) -> float:
    """Median wall time of fn in milliseconds (device events through Triton's do_bench on CUDA)."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=reps * 10, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def weight_bytes_per_param(layer: nn.Module, params: int) -> float:
    tensors = [*layer.parameters(), *layer.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / params


VARIANTS = ("bf16", "fp8", "int8", "int8-dequant", "torchao-tensorwise", "torchao-rowwise")


def build_variant(variant: str, linear: nn.Linear) -> nn.Module:
    """The frozen layer of one variant, built from the same bf16 Linear."""
    if variant == "bf16":
        return linear
    if variant == "fp8":
        return Fp8Linear.from_linear(linear)
    if variant.startswith("int8"):
        return Int8Linear.from_linear(linear)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    module = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None))
    module = module.to(linear.weight.device, torch.bfloat16).requires_grad_(False)
    module[0].load_state_dict(linear.state_dict())
    recipe = variant.removeprefix("torchao-")
    convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name(recipe))
    torch._dynamo.reset()  # a fresh compile per shape: the recompile limit would fall back to eager
    return torch.compile(module)


@contextlib.contextmanager
def int8_mode(variant: str):
    """int8-dequant: the int8 layer with its activation quantization switched off (weight-only at any size)."""
    saved = qa.INT8_MATMUL_MIN_ROWS
    if variant == "int8-dequant":
        qa.INT8_MATMUL_MIN_ROWS = sys.maxsize
    try:
        yield
    finally:
        qa.INT8_MATMUL_MIN_ROWS = saved


def bench_shape(name: str, args, device: torch.device) -> list[dict]:
    """Time and check every variant on one shape; returns one row per variant."""
    in_f, out_f, bias = SHAPES[name]
    in_f, out_f = in_f // args.shrink, out_f // args.shrink
    linear = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=torch.bfloat16).requires_grad_(False)
    sets = [
        (
            torch.randn(args.tokens, in_f, device=device, dtype=torch.bfloat16).requires_grad_(True),
            torch.randn(args.tokens, out_f, device=device, dtype=torch.bfloat16),
        )
        for _ in range(INPUT_SETS)
    ]  # x [M, in], grad_out [M, out]
    x0, g0 = sets[0]
    ref_out = x0.detach().float() @ linear.weight.float().t()
    if bias:
        ref_out += linear.bias.float()
    ref_grad = g0.float() @ linear.weight.float()
    rows = []
    for variant in ["bf16"] + [v for v in args.variants if v != "bf16"]:
        layer = build_variant(variant, linear)
        cycle = itertools.cycle(sets)

        def forward_backward(layer=layer, cycle=cycle):
            x, g = next(cycle)
            torch.autograd.grad(layer(x), x, g)

        def forward(layer=layer, cycle=cycle):
            with torch.no_grad():
                layer(next(cycle)[0])

        with int8_mode(variant):
            out = layer(x0)
            (grad,) = torch.autograd.grad(out, x0, g0)
            fwd_bwd = median_ms(forward_backward, args.reps)
            fwd = median_ms(forward, args.reps)
        rows.append(
            {
                "shape": name,
                "variant": variant,
                "fwd_bwd_ms": fwd_bwd,
                "fwd_ms": fwd,
                "tflops": 4 * args.tokens * in_f * out_f / fwd_bwd / 1e9,
                "out_err": rel_error(out, ref_out),
                "grad_err": rel_error(grad, ref_grad),
                "bytes_per_param": weight_bytes_per_param(layer, in_f * out_f),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_parts(name: str, args, device: torch.device) -> dict[str, float]:
    """The pieces of the fp8 and int8 paths on one shape, to see where the time goes."""
    in_f, out_f = (dim // args.shrink for dim in SHAPES[name][:2])
    x = torch.randn(args.tokens, in_f, device=device, dtype=torch.bfloat16)  # [M, in]
    g = torch.randn(args.tokens, out_f, device=device, dtype=torch.bfloat16)  # [M, out]
    weight = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) / in_f**0.5
    w8, ws = qk.quantize_weight(weight, "fp8")
    x8, xs = qk.quantize_rows(x, "fp8")
    g8, gs = qk.quantize_rows(g, "fp8", ws)
    w8t = qk.transposed_codes(w8)
    ones = torch.ones(1, in_f, device=device)
    wi, wis = qk.quantize_weight(weight, "int8")
    xi, xis = qk.quantize_rows(x, "int8")
    acc = torch._int_mm(xi, wi.t())
    bias = torch.randn(out_f, device=device, dtype=torch.bfloat16)
    parts = {
        "bf16 fwd matmul": lambda: x @ weight.t(),
        "bf16 grad matmul": lambda: g @ weight,
        "fp8 quantize x": lambda: qk.quantize_rows(x, "fp8"),
        "fp8 quantize grad (scale folded)": lambda: qk.quantize_rows(g, "fp8", ws),
        "fp8 transpose codes": lambda: qk.transposed_codes(w8),
        "fp8 transpose codes (torch)": lambda: w8.view(torch.uint8).t().contiguous(),
        "fp8 fwd matmul": lambda: qa.fp8_matmul(x8, xs, w8, ws[None], None, torch.bfloat16),
        "fp8 fwd matmul +bias": lambda: qa.fp8_matmul(x8, xs, w8, ws[None], bias, torch.bfloat16),
        "fp8 grad matmul": lambda: qa.fp8_matmul(g8, gs, w8t, ones, None, torch.bfloat16),
        "fp8 grad matmul exact_accum": lambda: qa.fp8_matmul(g8, gs, w8t, ones, None, torch.bfloat16, False),
        "int8 quantize x": lambda: qk.quantize_rows(x, "int8"),
        "int8 _int_mm": lambda: torch._int_mm(xi, wi.t()),
        "int8 rescale int32": lambda: qk.rescale_int32(acc, xis, wis, None, torch.bfloat16),
        "int8 dequantize weight": lambda: qk.dequantize_weight(wi, wis, torch.bfloat16),
        "int8 dequantize weight (torch)": lambda: qk.dequantize_weight_reference(wi, wis, torch.bfloat16),
    }
    times = {}
    for part, fn in parts.items():
        try:
            times[part] = median_ms(fn, args.reps)
        except (RuntimeError, ValueError) as error:  # reported, e.g. an fp8 combination cuBLASLt refuses
            times[part] = float("nan")
            print(f"{name}: {part}: {type(error).__name__}: {str(error)[:200]}", flush=True)
    return times


def print_table(rows: list[dict]) -> None:
    base = {row["shape"]: row["fwd_bwd_ms"] for row in rows if row["variant"] == "bf16"}
    header = f"{'shape':8} {'variant':18} {'fwd+bwd ms':>10} {'fwd ms':>8} {'x bf16':>7} {'TFLOP/s':>8} "
    print(header + f"{'out err':>8} {'grad err':>8} {'B/param':>7}")
    for row in rows:
        print(
            f"{row['shape']:8} {row['variant']:18} {row['fwd_bwd_ms']:10.3f} {row['fwd_ms']:8.3f} "
            f"{base[row['shape']] / row['fwd_bwd_ms']:7.2f} {row['tflops']:8.0f} {row['out_err']:8.4f} "
            f"{row['grad_err']:8.4f} {row['bytes_per_param']:7.3f}"
        )
    variants = dict.fromkeys(row["variant"] for row in rows)
    print("one block's 7 token-wide Linears (qkv, proj x3, w1 x2, w2): fwd+bwd ms, and with activation")
    print("checkpointing, where every forward runs twice (2 fwd + bwd):")

    def block_ms(variant: str, forward_weight: int) -> float:
        return sum(
            BLOCK_COUNTS[r["shape"]] * (r["fwd_bwd_ms"] + (forward_weight - 1) * r["fwd_ms"])
            for r in rows
            if r["variant"] == variant
        )

    for variant in variants:
        plain, recompute = block_ms(variant, 1), block_ms(variant, 2)
        print(
            f"  {variant:18} {plain:8.2f} ms  x{block_ms('bf16', 1) / plain:.2f} vs bf16   "
            f"checkpointed {recompute:8.2f} ms  x{block_ms('bf16', 2) / recompute:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, default=37440, help="rows of the activations (default: 93x480x832)"
    )
    parser.add_argument("--shrink", type=int, default=1, help="divide every width by this (CPU smoke runs)")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per measurement (about)")
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=["bf16", "fp8", "int8", "int8-dequant"],
        help=f"comma-separated, from {','.join(VARIANTS)} (torchao ones are compiled; bf16 always runs)",
    )
    parser.add_argument("--parts", action="store_true", help="also time the pieces of the fp8 / int8 paths")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rows, parts = [], {}
    for name in SHAPES:
        rows += bench_shape(name, args, device)
        if args.parts:
            parts[name] = bench_parts(name, args, device)
            print(json.dumps({name: parts[name]}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, tokens {args.tokens}")
    print_table(rows)
    for name, times in parts.items():
        print(f"{name}: " + ", ".join(f"{part} {ms:.3f}" for part, ms in times.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "parts": parts}, indent=2))


if __name__ == "__main__":
    main()
