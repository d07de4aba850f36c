"""Rank 0's training log: one JSON line per step, TensorBoard scalars, and the loss curve as loss.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
LOSS_PLOT_NAME = "loss.png"


class MetricsLog:
    """Append step metrics to `<output_dir>/metrics.jsonl` and, when asked, to TensorBoard."""

    def __init__(self, output_dir: str | Path, tensorboard_dir: str | Path | None) -> None:
        self.path = Path(output_dir) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One line {"step": step, **metrics}; numbers also go to TensorBoard under train/<name>."""
        with self.path.open("a", encoding="utf-8") as sink:
            sink.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file; a resumed run may repeat steps, the later line wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics_path: str | Path, out_path: str | Path, smoothing: int = 10) -> None:
    """Draw the loss per step and its moving average to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        raise ValueError(f"{metrics_path}: no 'loss' values to plot")
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    window = max(1, min(smoothing, len(losses)))
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"moving average ({window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching MSE (noise frames)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(out_path), dpi=100)
    plt.close(fig)
