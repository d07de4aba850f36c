"""Bucket grid, cover-crop and frame rules."""

import pytest
import torch

from longcat_dist.config_values import ConfigError
from longcat_dist.data.pixels import cover_crop, resize_to_bucket
from sharding.buckets import bucket_size, usable_frames


@pytest.mark.parametrize(
    ("source", "resolution", "bucket"),
    [
        ((1080, 1920), 480, (480, 832)),  # 16:9 -> ratio 0.58 bucket
        ((1920, 1080), 480, (832, 480)),  # portrait keeps its orientation
        ((1080, 1920), 720, (720, 1280)),
        ((480, 480), 480, (480, 480)),
        ((500, 505), 480, (480, 480)),  # nearly square goes to the square bucket
        ((100, 1000), 480, (480, 1152)),  # 10:1 clamps to at most 2.5:1
        ((64, 128), 64, (64, 128)),
    ],
)
def test_bucket_size_follows_the_grid(source, resolution, bucket):
    height, width = bucket_size(*source, resolution)
    assert (height, width) == bucket
    assert height % 16 == 0 and width % 16 == 0
    assert max(height, width) / min(height, width) <= 2.5


def test_resolution_off_the_grid_is_an_error():
    with pytest.raises(ConfigError, match=r"resolution.*500.*divisible by 16"):
        bucket_size(1080, 1920, 500)


def test_cover_crop_covers_and_centres():
    assert cover_crop(1080, 1920, 480, 832) == (480, 854, 0, 11)
    resize_h, resize_w, top, left = cover_crop(1000, 400, 832, 480)  # too narrow: scale by width
    assert resize_w == 480 and resize_h >= 832 and top == (resize_h - 832) // 2 and left == 0


def test_resize_to_bucket_keeps_the_centre():
    frames = torch.zeros(5, 60, 100, 3, dtype=torch.uint8)  # [F, H, W, 3]
    frames[:, :, 40:60] = 255  # a white vertical band in the middle
    pixels = resize_to_bucket(frames, 32, 32)
    assert pixels.shape == (3, 5, 32, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    centre, edge = pixels[:, :, 16, 16], pixels[:, :, 16, 0]
    assert torch.allclose(centre, torch.ones_like(centre), atol=0.05)
    assert torch.allclose(edge, -torch.ones_like(edge), atol=0.05)


@pytest.mark.parametrize(
    ("available", "requested", "min_frames", "expected"),
    [(100, 93, 93, 93), (93, 93, 93, 93), (92, 93, 89, 89), (92, 93, 93, None), (12, 93, 9, 9), (8, 9, 9, None),
     (1, 93, 1, 1), (0, 93, 1, None)],
)  # fmt: skip
def test_usable_frames(available, requested, min_frames, expected):
    assert usable_frames(available, requested, min_frames) == expected
