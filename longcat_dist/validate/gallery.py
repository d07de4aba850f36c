"""The validation gallery: `<output_dir>/index.html` with every step's videos side by side, built from disk."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

VALIDATION_DIR = "validation"
METRICS_FILE = "metrics.json"
ERROR_FILE = "error.txt"
STEP_DIR_PATTERN = re.compile(r"^step_(\d+)$")
SHOWN_METRICS = ("latent_mse", "latent_psnr", "first_frame_mae")

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 4px; vertical-align: top; font-size: 12px; }
video { max-width: 320px; display: block; }
.failed { color: #b00; }
"""


def step_dir(output_dir: Path, step: int) -> Path:
    """The folder of one validation step: `<output_dir>/validation/step_<k>`."""
    return output_dir / VALIDATION_DIR / f"step_{step:07d}"


def _steps(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / VALIDATION_DIR
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _format(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def _cell(step_path: Path, record: dict | None, output_dir: Path) -> str:
    if record is None:
        return "<td>-</td>"
    link = html.escape(str((step_path / record["video"]).relative_to(output_dir)))
    numbers = " ".join(f"{name}={_format(record.get(name))}" for name in SHOWN_METRICS if name in record)
    video = f'<video src="{link}" controls loop muted autoplay playsinline></video>'
    return f'<td>{video}<a href="{link}">mp4</a> {html.escape(numbers)}</td>'


def write_gallery(output_dir: Path) -> Path:
    """Write `<output_dir>/index.html` (rows: eval samples, columns: steps) from the step folders; returns its path."""
    steps = _steps(output_dir)
    columns: list[tuple[int, Path, dict[str, dict]]] = []
    failed: list[int] = []
    captions: dict[str, str] = {}
    for step, path in steps:
        metrics_path = path / METRICS_FILE
        if not metrics_path.is_file():
            if (path / ERROR_FILE).is_file():
                failed.append(step)
            continue
        report = json.loads(metrics_path.read_text())
        records = {s["key"]: s for s in report["samples"]}
        for key, record in records.items():
            captions.setdefault(key, record.get("caption", ""))
        columns.append((step, path, records))
    header = "".join(f"<th>step {step}</th>" for step, _, _ in columns)
    rows = []
    for key, caption in captions.items():
        cells = "".join(_cell(path, records.get(key), output_dir) for _, path, records in columns)
        rows.append(f"<tr><th>{html.escape(key)}<br><small>{html.escape(caption)}</small></th>{cells}</tr>")
    failures = (
        f'<p class="failed">Failed validation steps (see error.txt): {", ".join(map(str, failed))}</p>'
        if failed
        else ""
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>LongCat LoRA validation</title>"
        f"<style>{STYLE}</style></head><body><h1>Validation videos</h1>{failures}"
        f"<table><tr><th>sample</th>{header}</tr>{''.join(rows)}</table></body></html>\n"
    )
    index = output_dir / "index.html"
    index.write_text(page)
    return index
