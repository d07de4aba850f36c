"""`longcat-shards demo-data DIR`: a small synthetic paired I2V dataset of moving shapes, plus its config.

Learnable by design: the start frame shows the shape, its colour and place; the caption names the direction; the
motion follows from the two (a fixed speed in a straight line).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sharding.media import write_image, write_video

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
BACKGROUND = (24, 24, 24)
SHAPE_SIZE = 14  # pixels across
SPEED = 3  # pixels per frame
DEMO_FPS = 8.0
DEMO_FRAMES = 9
DEMO_RESOLUTION = 64
VAL_ID = "demo-val"
TRAIN_ID = "demo-train"


@dataclass(frozen=True)
class DemoClip:
    """What one synthetic clip shows."""

    color: str
    shape: str
    direction: str
    top: int  # start position of the shape's top-left corner
    left: int
    height: int
    width: int

    @property
    def caption(self) -> str:
        """The caption: what moves and where."""
        return f"a {self.color} {self.shape} moves {self.direction}"


def render(clip: DemoClip, num_frames: int = DEMO_FRAMES) -> Tensor:
    """The clip's frames, uint8 [F, H, W, 3]."""
    frames = (
        torch.tensor(BACKGROUND, dtype=torch.uint8).expand(num_frames, clip.height, clip.width, 3).clone()
    )
    ys, xs = torch.meshgrid(torch.arange(SHAPE_SIZE), torch.arange(SHAPE_SIZE), indexing="ij")
    radius = (SHAPE_SIZE - 1) / 2
    inside = torch.ones_like(ys, dtype=torch.bool)
    if clip.shape == "circle":
        inside = (ys - radius) ** 2 + (xs - radius) ** 2 <= radius**2
    dy, dx = DIRECTIONS[clip.direction]
    for t in range(num_frames):
        top, left = clip.top + dy * SPEED * t, clip.left + dx * SPEED * t
        patch = frames[t, top : top + SHAPE_SIZE, left : left + SHAPE_SIZE]
        patch[inside] = torch.tensor(COLORS[clip.color], dtype=torch.uint8)
    return frames


def random_clip(rng: random.Random, height: int, width: int, num_frames: int = DEMO_FRAMES) -> DemoClip:
    """A clip whose shape stays inside the frame for its whole path."""
    direction = rng.choice(sorted(DIRECTIONS))
    dy, dx = DIRECTIONS[direction]
    travel = SPEED * (num_frames - 1)

    def start(extent: int, step: int) -> int:
        lo, hi = (travel, extent - SHAPE_SIZE) if step < 0 else (0, extent - SHAPE_SIZE - travel * step)
        return rng.randint(lo, hi)

    return DemoClip(rng.choice(sorted(COLORS)), rng.choice(SHAPES), direction, start(height, dy), start(width, dx),
                    height, width)  # fmt: skip


def _write_split(root: Path, name: str, count: int, wide: int, rng: random.Random) -> None:
    clips_dir, frames_dir = root / name / "clips", root / name / "start_frames"
    clips_dir.mkdir(parents=True, exist_ok=True)
    frames_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width = 2 * DEMO_RESOLUTION if index < wide else DEMO_RESOLUTION
        clip = random_clip(rng, DEMO_RESOLUTION, width)
        frames = render(clip)
        stem = f"{name}_{index:03d}"
        write_video(clips_dir / f"{stem}.mp4", frames, DEMO_FPS)
        write_image(frames_dir / f"{stem}.png", frames[0])
        (clips_dir / f"{stem}.txt").write_text(clip.caption + "\n", encoding="utf-8")


def _backends() -> list[dict]:
    entries = []
    for split, dataset_id in (("train", TRAIN_ID), ("val", VAL_ID)):
        start_id = f"{dataset_id}-start"
        entries.append({
            "id": dataset_id, "type": "local", "dataset_type": "video",
            "instance_data_dir": f"{split}/clips", "caption_strategy": "textfile",
            "resolution": DEMO_RESOLUTION, "resolution_type": "pixel_area",
            "cache_dir_vae": f"cache/{dataset_id}",
            "video": {"num_frames": DEMO_FRAMES, "min_frames": DEMO_FRAMES, "is_i2v": True},
            "conditioning_data": [start_id],
        })  # fmt: skip
        entries.append({"id": start_id, "type": "local", "dataset_type": "conditioning",
                        "instance_data_dir": f"{split}/start_frames"})  # fmt: skip
    return entries


def make_demo_data(root: Path, *, train: int = 24, val: int = 4, seed: int = 0) -> Path:
    """Write train and val splits (a third of them 64x128, the rest 64x64) and multidatabackend.json; returns it."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    _write_split(root, "train", train, train // 3, rng)
    _write_split(root, "val", val, val // 2, rng)
    config = root / "multidatabackend.json"
    config.write_text(json.dumps(_backends(), indent=2) + "\n", encoding="utf-8")
    return config
