"""Encode throughput of the full-size Wan 2.1 VAE (random weights, default config) on one GPU: clips/s.

Run: python3 bench/vae.py --frames 93 --height 480 --width 832 --repeats 3
Only torch and diffusers are needed, so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKLWan


def _time_encode(vae: AutoencoderKLWan, frames: torch.Tensor, repeats: int) -> float:
    """Seconds per encode call (posterior mode, as the shard builder does), after one warm-up call."""
    with torch.no_grad():
        vae.encode(frames).latent_dist.mode()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            vae.encode(frames).latent_dist.mode()
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    """Print a markdown table row per batch size."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, VAE params "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M, bf16")  # fmt: skip
    print("| input | batch | s / call | clips / s | peak GiB |\n|---|---|---|---|---|")
    for frames in (args.frames, 1):  # the clip, then the start frame as a one-frame video
        for batch in args.batch:
            torch.cuda.reset_peak_memory_stats()
            pixels = (
                torch.rand(batch, 3, frames, args.height, args.width, device="cuda", dtype=torch.bfloat16) * 2
                - 1
            )
            seconds = _time_encode(vae, pixels, args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(
                f"| {frames}x{args.height}x{args.width} | {batch} | {seconds:.3f} | {batch / seconds:.3f} | {peak:.1f} |"
            )


if __name__ == "__main__":
    main()
