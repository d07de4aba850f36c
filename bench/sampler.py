"""Validation cost on one GPU: the I2V sampler at full size with a reduced-depth DiT, and the VAE decode.

Run from the repo root:  PYTHONPATH=. python3 bench/sampler.py [--depth 1 2] [--steps 40] [--frames 93]
The DiT has production width (hidden 4096, 32 heads, text 512 x 4096) and random bf16 weights; sampling runs the real
loop (CFG [negative; positive] in one forward, CFG-Zero*, fp32 Euler). Two depths give the per-block slope, from which
the 48-block time is extrapolated: t(48) = t(d1) + (48 - d1) * (t(d2) - t(d1)) / (d2 - d1).
The VAE row decodes the clip's latents with the default (Wan 2.1) AutoencoderKLWan config, random weights, bf16.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKLWan

from longcat_dist.model.transformer import DiTConfig, LongCatVideoTransformer3DModel
from longcat_dist.validate.sampler import latent_frames_for, sample_i2v

PRODUCTION_DEPTH = 48
TEXT_TOKENS = 512  # umT5 max length: the official pipeline pads every prompt to it
PROMPT_TOKENS = 40  # valid tokens of a typical prompt; the rest are zero-padded (text_tokens_zero_pad)
WARMUP_STEPS = 2  # compiles/autotunes kernels (BSA) before timing


def _inputs(frames: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """Start-frame latent [1, 16, 1, h, w] and [neg; pos] text [1, 1, 512, 4096] each, with masks [1, 512]."""
    cond = torch.randn(1, 16, 1, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 1, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.long, device="cuda")
    mask[0, :1] = 1  # the empty prompt: EOS only
    mask[1, :PROMPT_TOKENS] = 1
    return cond, text[1:], mask[1:], text[:1], mask[:1]


def time_sampler(
    depth: int, backend: str, steps: int, frames: int, height: int, width: int
) -> tuple[float, float]:
    """Seconds per sampling step (CFG on) and peak GiB for a DiT of `depth` blocks."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LongCatVideoTransformer3DModel(DiTConfig(depth=depth)).to(torch.bfloat16).eval()
    model.set_attention_backend(backend)
    cond, text, mask, negative, negative_mask = _inputs(frames, height, width)
    latent_frames = latent_frames_for(frames)

    def run(num_steps: int) -> None:
        sample_i2v(model, cond, text, mask, negative_text=negative, negative_mask=negative_mask,
                   num_latent_frames=latent_frames, num_steps=num_steps, guidance=4.0,
                   generators=[torch.Generator().manual_seed(0)])  # fmt: skip

    run(WARMUP_STEPS)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run(steps)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    return seconds, torch.cuda.max_memory_allocated() / 2**30


def time_vae_decode(frames: int, height: int, width: int, repeats: int = 2) -> tuple[float, float]:
    """Seconds per decode of one clip's latents [1, 16, T, h, w] and peak GiB (default Wan VAE, bf16)."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()
    latents = torch.randn(
        1, 16, latent_frames_for(frames), height // 8, width // 8, device="cuda", dtype=torch.bfloat16
    )
    with torch.no_grad():
        vae.decode(latents)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(repeats):
            vae.decode(latents)
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    """Print a markdown table: sampler rows per backend and depth, the 48-block extrapolation, the VAE decode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs=2, default=[1, 2], help="two reduced depths for the slope")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument(
        "--backends", nargs="+", default=["sdpa", "bsa"], help="self-attention backends to time"
    )
    args = parser.parse_args()
    shape = f"{args.frames}x{args.height}x{args.width}"
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, latents "
          f"[1, 16, {latent_frames_for(args.frames)}, {args.height // 8}, {args.width // 8}], bf16, CFG 4.0")  # fmt: skip
    print("| part | backend | blocks | s / step | s / clip | peak GiB |\n|---|---|---|---|---|---|")
    low, high = args.depth
    for backend in args.backends:
        times = {}
        for depth in (low, high):
            seconds, peak = time_sampler(depth, backend, args.steps, args.frames, args.height, args.width)
            torch.cuda.empty_cache()  # the model of this row is gone; give its memory back before the next
            times[depth] = seconds
            print(
                f"| sampler {shape} | {backend} | {depth} | {seconds:.3f} | {seconds * args.steps:.1f} | {peak:.1f} |"
            )
        per_block = (times[high] - times[low]) / (high - low)
        full = times[low] + (PRODUCTION_DEPTH - low) * per_block
        print(f"| sampler {shape}, extrapolated | {backend} | {PRODUCTION_DEPTH} | {full:.2f} | "
              f"{full * args.steps:.0f} | - |")  # fmt: skip
    seconds, peak = time_vae_decode(args.frames, args.height, args.width)
    print(f"| VAE decode {shape} | - | - | - | {seconds:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
