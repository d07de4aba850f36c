"""The synthetic demo dataset: motion that follows the caption, readable files, a valid config."""

import random
from pathlib import Path

import torch

from longcat_dist.config_data import load_data_backends
from longcat_dist.data.pixels import read_image
from sharding.demo_data import BACKGROUND, DEMO_FRAMES, SPEED, VAL_ID, make_demo_data, random_clip, render
from sharding.media import read_video


def _centre(frame: torch.Tensor) -> tuple[float, float]:
    mask = (frame.int() - torch.tensor(BACKGROUND)).abs().sum(-1) > 0  # [H, W]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return ys.float().mean().item(), xs.float().mean().item()


def test_shapes_move_as_the_caption_says():
    rng = random.Random(1)
    for _ in range(12):
        clip = random_clip(rng, 64, 128)
        frames = render(clip)  # [F, H, W, 3]
        (y0, x0), (y1, x1) = _centre(frames[0]), _centre(frames[-1])
        travel = SPEED * (DEMO_FRAMES - 1)
        expected = {"left": (0, -travel), "right": (0, travel), "up": (-travel, 0), "down": (travel, 0)}
        assert (round(y1 - y0), round(x1 - x0)) == expected[clip.direction], clip.caption


def test_demo_data_files_and_config(tmp_path: Path):
    config = make_demo_data(tmp_path, train=6, val=2)
    datasets = {d.id: d for d in load_data_backends(config)}
    assert datasets[VAL_ID].conditioning_data == (f"{VAL_ID}-start",)
    clips = sorted((tmp_path / "train" / "clips").glob("*.mp4"))
    assert len(clips) == 6 and len(list((tmp_path / "val" / "clips").glob("*.mp4"))) == 2
    widths = set()
    for clip in clips:
        frames, fps = read_video(clip)
        start = read_image(tmp_path / "train" / "start_frames" / f"{clip.stem}.png")
        assert frames.shape[0] == DEMO_FRAMES and fps == 8.0
        assert (frames[0].float() - start.float()).abs().mean() < 3  # the PNG is the clip's first frame
        assert clip.with_suffix(".txt").read_text().startswith("a ")
        widths.add(frames.shape[2])
    assert widths == {64, 128}  # two buckets
