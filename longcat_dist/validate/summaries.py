"""TensorBoard summaries for validation: scalars, PNG images and GIF videos, written as plain event protos."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from longcat_dist.validate.media import DEFAULT_FPS, gif_bytes

RGB_CHANNELS = 3


class ValidationSummaries:
    """Appends validation summaries to an event file under `logdir` (one writer per actor life)."""

    def __init__(self, logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir), filename_suffix=".validation")

    def _write(self, step: int, values: list[Summary.Value]) -> None:
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One scalar per tag."""
        self._write(step, [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])

    def image(self, step: int, tag: str, image: Image.Image) -> None:
        """A PNG image summary."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded = Summary.Image(
            height=image.height,
            width=image.width,
            colorspace=RGB_CHANNELS,
            encoded_image_string=buffer.getvalue(),
        )
        self._write(step, [Summary.Value(tag=tag, image=encoded)])

    def video(self, step: int, tag: str, frames: np.ndarray, fps: int = DEFAULT_FPS) -> None:
        """A video summary from uint8 frames [F, H, W, 3]: TensorBoard plays GIF image summaries as video."""
        encoded = Summary.Image(
            height=frames.shape[1],
            width=frames.shape[2],
            colorspace=RGB_CHANNELS,
            encoded_image_string=gif_bytes(frames, fps),
        )
        self._write(step, [Summary.Value(tag=tag, image=encoded)])

    def flush(self) -> None:
        """Push pending events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
