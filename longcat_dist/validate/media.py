"""Validation media: start frames in, frames to uint8, H.264 MP4 files, contact sheets, GIF bytes for TensorBoard."""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from longcat_dist.data.pixels import MediaError, read_image, resize_to_bucket

# The official demos write 15 fps.
DEFAULT_FPS = 15
# Constant-quality H.264: visually clean at a size that keeps a gallery of many steps browsable.
MP4_CRF = "18"
SHEET_GAP = 4
LABEL_HEIGHT = 14
# TensorBoard previews: a full 93 x 480 x 832 clip as GIF is tens of MB per step in the event file; the MP4 has
# the full size.
GIF_MAX_WIDTH = 320


def load_start_frame(path: Path, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, height, width] in [-1, 1], preprocessed exactly as the shard builder does.

    Cover then centre crop (not the official stretch to the bucket), so that the aspect ratio is kept.
    """
    try:
        image = read_image(path)  # [H, W, 3] uint8
    except MediaError as err:
        raise MediaError(
            f"start frame {path}: not a readable image ({err.__cause__}); give a PNG or JPEG."
        ) from err
    return resize_to_bucket(image[None], height, width)[:, 0]


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Video [3, F, H, W] in [-1, 1] to uint8 [F, H, W, 3]."""
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames_to_uint8: expected [3, F, H, W]; got {tuple(frames.shape)}.")
    pixels = ((frames.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """Image [3, H, W] in [-1, 1] to uint8 [H, W, 3]."""
    return frames_to_uint8(image[:, None])[0]


def write_mp4(frames: np.ndarray, path: Path, fps: int = DEFAULT_FPS) -> Path:
    """Write uint8 frames [F, H, W, 3] as an H.264 (yuv420p) MP4."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 {path}: expected uint8 [F, H, W, 3]; got {frames.dtype} {frames.shape}.")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_mp4 {path}: H.264 4:2:0 needs even sizes; got {height}x{width}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": MP4_CRF}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def pick_frames(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first to the last frame."""
    if num_frames <= count:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def _tile(frames: Sequence[np.ndarray], label: str, height: int, width: int) -> Image.Image:
    strip = Image.new("RGB", (len(frames) * (width + SHEET_GAP), height + LABEL_HEIGHT), "white")
    for i, frame in enumerate(frames):
        strip.paste(Image.fromarray(frame), (i * (width + SHEET_GAP), LABEL_HEIGHT))
    ImageDraw.Draw(strip).text((2, 1), label, fill="black")
    return strip


def contact_row(
    start_frame: np.ndarray, generated: np.ndarray, ground_truth: np.ndarray | None, count: int = 4
) -> Image.Image:
    """One sample's row: the start frame, `count` generated frames, and the same frames of the ground truth if given."""
    height, width = start_frame.shape[:2]
    indices = pick_frames(generated.shape[0], count)
    strips = [
        _tile([start_frame], "start", height, width),
        _tile([generated[i] for i in indices], f"generated {indices}", height, width),
    ]
    if ground_truth is not None:
        strips.append(
            _tile([ground_truth[i] for i in indices if i < len(ground_truth)], "ground truth", height, width)
        )
    row = Image.new("RGB", (sum(s.width for s in strips), strips[0].height), "white")
    offset = 0
    for strip in strips:
        row.paste(strip, (offset, 0))
        offset += strip.width
    return row


def contact_sheet(rows: Sequence[Image.Image]) -> Image.Image:
    """Stack per-sample rows into one sheet, top to bottom."""
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + SHEET_GAP for r in rows)), "white")
    offset = 0
    for row in rows:
        sheet.paste(row, (0, offset))
        offset += row.height + SHEET_GAP
    return sheet


def gif_bytes(frames: np.ndarray, fps: int = DEFAULT_FPS, max_width: int = GIF_MAX_WIDTH) -> bytes:
    """Encode uint8 frames [F, H, W, 3] as an animated GIF (TensorBoard's video format), at most max_width wide."""
    images = [Image.fromarray(frame) for frame in frames]
    if images[0].width > max_width:
        size = (max_width, max(2, round(images[0].height * max_width / images[0].width)))
        images = [image.resize(size, Image.Resampling.BILINEAR) for image in images]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0
    )
    return buffer.getvalue()
