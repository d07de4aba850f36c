"""Bucket math, pure: which (height, width) a clip goes to and how many frames it keeps.

The crop to a bucket is longcat_dist.data.pixels.resize_to_bucket, shared with validation.

The grid rule (shared with longcat_dist.config.check_resolution): both sides divisible by 16, the short side is the
resolution, the long side a multiple of the alignment, aspect ratios clamped to 2.5:1.
"""

from __future__ import annotations

import math

from longcat_dist.config_values import ConfigError, check_resolution

MAX_ASPECT = 2.5  # clips wider or taller than 2.5:1 are cropped to the widest bucket
PIXEL_MULTIPLE = 16  # VAE x8 then DiT patch x2
FRAME_STRIDE = 4  # the Wan VAE packs frames as 1 + 4k


def bucket_size(height: int, width: int, resolution: int, alignment: int = 64) -> tuple[int, int]:
    """The (height, width) bucket closest in aspect ratio to a height x width source at this resolution."""
    if height < 1 or width < 1:
        raise ValueError(f"source size {height}x{width}: both sides must be positive")
    if resolution % PIXEL_MULTIPLE:
        raise ConfigError("sharding", "resolution", resolution, f"must be divisible by {PIXEL_MULTIPLE}")
    aspect = min(max(height, width) / min(height, width), MAX_ASPECT)
    longest = math.floor(resolution * MAX_ASPECT)
    candidates = [resolution] + [
        side
        for side in range(alignment, longest + 1, alignment)
        if side > resolution and side % PIXEL_MULTIPLE == 0
    ]
    # Closest in log-ratio, so 10% too wide and 10% too narrow cost the same; ties go to the smaller bucket.
    long_side = min(candidates, key=lambda side: (abs(math.log(side / resolution) - math.log(aspect)), side))
    size = (long_side, resolution) if height > width else (resolution, long_side)
    check_resolution(*size, key="bucket", alignment=alignment, where="sharding")
    return size


def usable_frames(available: int, requested: int, min_frames: int) -> int | None:
    """The largest count <= min(available, requested) with (n - 1) % 4 == 0, or None if that is below min_frames."""
    count = min(available, requested)
    if count < 1:
        return None
    count -= (count - 1) % FRAME_STRIDE
    return count if count >= min_frames else None
