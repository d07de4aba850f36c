"""Pixels in, pure: read an image file and fit frames to a bucket (cover, then centre crop).

The shard builder and validation both call these, so a start frame becomes the same tensor in the shards, in
prompt-mode validation and as the reference of dataset-mode validation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor


class MediaError(ValueError):
    """A video or image that cannot be read."""


def read_image(path: Path) -> Tensor:
    """An image as uint8 [H, W, 3] (RGB; alpha dropped)."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MediaError(f"{path}: cannot read image ({err})") from err
    return torch.from_numpy(rgb.copy())


def cover_crop(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[int, int, int, int]:
    """(resize_h, resize_w, top, left): scale to cover dst keeping aspect, then centre-crop to dst."""
    scale = max(dst_h / src_h, dst_w / src_w)
    # ceil keeps both resized sides at least the target, so the crop never runs off the image.
    resize_h, resize_w = (
        max(dst_h, math.ceil(src_h * scale - 1e-6)),
        max(dst_w, math.ceil(src_w * scale - 1e-6)),
    )
    return resize_h, resize_w, (resize_h - dst_h) // 2, (resize_w - dst_w) // 2


def resize_to_bucket(frames: Tensor, height: int, width: int) -> Tensor:
    """uint8 frames [F, H, W, 3] -> floats [3, F, height, width] in [-1, 1], resized to cover then centre-cropped."""
    src_h, src_w = frames.shape[1:3]
    resize_h, resize_w, top, left = cover_crop(src_h, src_w, height, width)
    pixels = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [F, 3, H, W]
    if (resize_h, resize_w) != (src_h, src_w):
        # antialias: a downscale from 1080p to 480p would alias badly without it.
        pixels = F.interpolate(
            pixels, size=(resize_h, resize_w), mode="bicubic", antialias=True, align_corners=False
        )
    pixels = pixels[:, :, top : top + height, left : left + width].clamp(-1.0, 1.0)
    return pixels.permute(1, 0, 2, 3).contiguous()  # [3, F, height, width]
