"""Benchmark: the block's fp32 islands, torch reference vs fused Triton kernels, at the LongCat training shape.

Run on one GPU from the repo root:  PYTHONPATH=. python bench/fused_block.py [--ops modulate,rope] [--out results/]
Times are medians of CUDA events. GB/s count the bytes a single pass must move (bf16 activations read and written
once, per-frame vectors and tables ignored), the same for both columns, so they compare like for like. "per block"
weighs each op by how often one DiT block runs it on all tokens (2 modulations, 2 gated adds, 3 big RMSNorms: self
q/k and cross q, 2 RoPEs).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from attention import time_ms  # bench/ is the script's directory, so its modules import by name

from longcat_dist.kernels.fused_block import fused_gated_add, fused_modulate, fused_rms_norm, fused_rope
from longcat_dist.model.layers import NORM_EPS, LayerNormFp32, RMSNormFp32, modulate
from longcat_dist.model.rope import apply_rope, rope_cos_sin
from longcat_dist.model.transformer import _gated_add

OPS = ("modulate", "gated_add", "rms_norm", "rope")
PER_BLOCK = {"modulate": 2, "gated_add": 2, "rms_norm": 3, "rope": 2}
# Activation passes (reads + writes of [B, N, C]) of one ideal fused forward / backward.
PASSES = {"modulate": (2, 3), "gated_add": (3, 3), "rms_norm": (2, 3), "rope": (2, 2)}


@dataclass
class Case:
    """One op: its differentiable inputs, the reference and the fused function of them."""

    inputs: list[torch.Tensor]
    reference: Callable[[], torch.Tensor]
    fused: Callable[[], torch.Tensor]


def build_case(op: str, args: argparse.Namespace) -> Case:
    dtype, device = getattr(torch, args.dtype), "cuda"
    batch, tokens, dim, frames = args.batch, args.tokens, args.heads * args.head_dim, args.frames

    def randn(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    if op in ("modulate", "gated_add"):
        x = randn(batch, tokens, dim, scale=3.0)
        mod = randn(
            batch, frames, 1, 3 * dim, dtype=torch.float32, scale=0.5
        )  # strided chunks, as in the block
        shift, scale, gate = mod.chunk(3, dim=-1)
        if op == "modulate":
            norm = LayerNormFp32(dim, elementwise_affine=False)
            return Case(
                [x, mod],
                lambda: modulate(norm, x, shift, scale, frames),
                lambda: fused_modulate(x, shift, scale, frames, NORM_EPS),
            )
        update = randn(batch, tokens, dim)
        return Case(
            [x, mod, update],
            lambda: _gated_add(x, gate, update, frames),
            lambda: fused_gated_add(x, gate, update, frames),
        )
    # q as self-attention gets it: a strided [B, nh, N, hd] view of the fused qkv projection.
    qkv = randn(batch, tokens, 3, args.heads, args.head_dim, scale=2.0)
    q = qkv.permute(2, 0, 3, 1, 4)[0]
    if op == "rms_norm":
        norm = (
            RMSNormFp32(args.head_dim).to(device, dtype).requires_grad_(False)
        )  # frozen, as in LoRA training
        return Case([qkv], lambda: norm(q), lambda: fused_rms_norm(q, norm.weight, NORM_EPS))
    per_frame = tokens // frames
    width = args.width
    cos, sin = rope_cos_sin(args.head_dim, (frames, per_frame // width, width), q.device)
    return Case([qkv], lambda: apply_rope(q, cos, sin), lambda: fused_rope(q, cos, sin))


def ulp_mismatch(got: torch.Tensor, want: torch.Tensor) -> tuple[int, float]:
    """Largest ulp distance of two bf16/fp16 tensors and the fraction of elements that differ."""

    def ordered(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    distance = (ordered(got) - ordered(want)).abs()
    return int(distance.max()), (distance > 0).float().mean().item()


def run_op(op: str, args: argparse.Namespace) -> dict:
    case = build_case(op, args)
    with torch.no_grad():
        ref, out = case.reference(), case.fused()
        max_ulp, fraction = ulp_mismatch(out, ref) if out.dtype != torch.float32 else (0, 0.0)
    grad = torch.randn_like(ref)
    row = dict(op=op, max_ulp=max_ulp, ulp_fraction=fraction)
    activation_bytes = ref.numel() * ref.element_size()
    for name, fn in (("torch", case.reference), ("fused", case.fused)):
        with torch.no_grad():
            forward = time_ms(fn, args.budget_ms)
        both = time_ms(lambda fn=fn: torch.autograd.grad(fn(), case.inputs, grad), args.budget_ms)
        passes_fwd, passes_bwd = PASSES[op]
        row[f"{name}_fwd_ms"] = forward
        row[f"{name}_fwdbwd_ms"] = both
        row[f"{name}_fwd_GBps"] = passes_fwd * activation_bytes / forward / 1e6
        row[f"{name}_fwdbwd_GBps"] = (passes_fwd + passes_bwd) * activation_bytes / both / 1e6
    return row


def print_table(rows: list[dict]) -> None:
    cols = [
        ("op", "{}"), ("torch_fwd_ms", "{:.3f}"), ("fused_fwd_ms", "{:.3f}"), ("torch_fwd_GBps", "{:.0f}"),
        ("fused_fwd_GBps", "{:.0f}"), ("torch_fwdbwd_ms", "{:.3f}"), ("fused_fwdbwd_ms", "{:.3f}"),
        ("torch_fwdbwd_GBps", "{:.0f}"), ("fused_fwdbwd_GBps", "{:.0f}"), ("max_ulp", "{}"), ("ulp_fraction", "{:.1e}"),
    ]  # fmt: skip
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(fmt.format(row[c]) for c, fmt in cols) + " |")
    if all(op in {r["op"] for r in rows} for op in OPS):
        for name in ("torch", "fused"):
            total = sum(PER_BLOCK[r["op"]] * r[f"{name}_fwdbwd_ms"] for r in rows)
            print(f"per block, forward + backward, {name}: {total:.2f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=37440, help="N = frames x Hp x Wp (24 x 30 x 52)")
    parser.add_argument("--frames", type=int, default=24, help="latent frames; must divide --tokens")
    parser.add_argument(
        "--width", type=int, default=52, help="Wp of the RoPE grid; must divide tokens/frames"
    )
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="timing budget per measurement")
    parser.add_argument("--out", type=Path, help="folder for fused_block.json")
    args = parser.parse_args(argv)
    args.ops = args.ops.split(",")
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    if args.tokens % args.frames or (args.tokens // args.frames) % args.width:
        parser.error(f"--frames {args.frames} and --width {args.width} must divide --tokens {args.tokens}")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fused_block.py times CUDA kernels; no GPU is visible here")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows = []
    for op in args.ops:
        rows.append(run_op(op, args))
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fused_block.json").write_text(
            json.dumps(dict(args=vars(args) | {"out": str(args.out)}, rows=rows), indent=1)
        )


if __name__ == "__main__":
    main()
