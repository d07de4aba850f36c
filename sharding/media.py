"""Videos in and out through PyAV (bundled FFmpeg), images out through Pillow; images in: longcat_dist.data.pixels."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from longcat_dist.data.pixels import MediaError


def read_video(path: Path, max_frames: int | None = None) -> tuple[Tensor, float]:
    """Decode up to max_frames frames -> (uint8 [F, H, W, 3], fps)."""
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{path}: cannot decode video ({err})") from err
    if not frames:
        raise MediaError(f"{path}: the video holds no decodable frames")
    return torch.from_numpy(np.stack(frames)), fps


def write_video(path: Path, frames: Tensor, fps: float, *, crf: int = 12) -> None:
    """uint8 [F, H, W, 3] (even H and W) -> an H.264 MP4."""
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for pixels in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def write_image(path: Path, pixels: Tensor) -> None:
    """uint8 [H, W, 3] -> an image file (format from the suffix)."""
    Image.fromarray(pixels.numpy()).save(path)


def to_uint8(frames: Tensor) -> Tensor:
    """Frames [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
