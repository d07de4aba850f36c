"""Each kind of bad input: a clear error (exit 2) or a counted skip, and nothing half-written left behind."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import UMT5Config

from longcat_dist.encoders import vae_config_fingerprint
from sharding.cli import main
from sharding.demo_data import DEMO_FRAMES, make_demo_data
from sharding.media import write_video


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Three good 64x64 demo clips (train_002..train_004), made once."""
    root = tmp_path_factory.mktemp("bad")
    make_demo_data(root, train=5, val=0)
    for stem in ("train_000", "train_001"):  # the 64x128 ones: keep one bucket
        (root / "train" / "clips" / f"{stem}.mp4").unlink()
        (root / "train" / "clips" / f"{stem}.txt").unlink()
        (root / "train" / "start_frames" / f"{stem}.png").unlink()
    return root / "train"


@pytest.fixture
def data(source: Path, tmp_path: Path) -> Path:
    shutil.copytree(source, tmp_path / "data")
    return tmp_path / "data"


def _build(data: Path, out: Path, *extra: str) -> int:
    return main(["build", "--clips", str(data / "clips"), "--start-frames", str(data / "start_frames"), "--out",
                 str(out), "--dataset-id", "bad", "--resolution", "64", "--frames", str(DEMO_FRAMES), "--tiny",
                 "--local", *extra])  # fmt: skip


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_unpaired_clips_are_listed_or_skipped_and_counted(data: Path, tmp_path: Path, capsys):
    (data / "start_frames" / "train_002.png").unlink()
    (data / "clips" / "train_003.txt").unlink()
    assert _build(data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert (
        "2 inputs cannot be paired" in err
        and "train_002: no start frame" in err
        and "train_003: no caption" in err
    )
    assert _nothing_written(tmp_path / "out")
    assert _build(data, tmp_path / "out", "--skip-unpaired") == 0
    out = capsys.readouterr().out
    assert "1 samples" in out and "skipped 2 inputs" in out and "train_002: no start frame" in out


def test_undecodable_short_and_unreadable_inputs_are_skipped_with_reasons(data: Path, tmp_path: Path, capsys):
    clips, frames = data / "clips", data / "start_frames"
    (clips / "broken.mp4").write_bytes(b"not a video at all" * 100)
    write_video(clips / "short.mp4", torch.zeros(5, 64, 64, 3, dtype=torch.uint8), 8.0)  # 5 < 9 frames
    (frames / "train_004.png").write_bytes(b"\x89PNG but truncated")
    for stem in ("broken", "short"):
        (clips / f"{stem}.txt").write_text("a red square moves left")
        shutil.copy(frames / "train_002.png", frames / f"{stem}.png")
    assert _build(data, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "2 samples" in out and "skipped 3 inputs" in out
    assert "broken.mp4: cannot decode video" in out
    assert "short.mp4: 5 frames, fewer than the minimum 9" in out
    assert "train_004.png: cannot read image" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total_samples"] == 2


def test_resolution_off_the_grid_is_an_error(data: Path, tmp_path: Path, capsys):
    assert _build(data, tmp_path / "out", "--resolution", "70") == 2
    assert "resolution" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_unknown_conditioning_id_is_a_config_error(source: Path, tmp_path: Path, capsys):
    config = make_demo_data(tmp_path, train=1, val=1)
    entries = json.loads(config.read_text())
    entries[0]["conditioning_data"] = ["no-such-frames"]
    config.write_text(json.dumps(entries))
    assert main(["build", "--config", str(config), "--tiny", "--local"]) == 2
    err = capsys.readouterr().err
    assert "conditioning_data" in err and "no-such-frames" in err and "no dataset has this id" in err
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def built(source: Path, tmp_path_factory) -> Path:
    """`source` built once with the defaults of `_build` (dataset "bad", 64 px, 9 frames, tiny umT5)."""
    out = tmp_path_factory.mktemp("built") / "out"
    assert _build(source, out) == 0
    return out


def _snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("flags", "field", "old", "new"),
    [
        (["--dataset-id", "other"], "dataset_id", "'bad'", "'other'"),
        (["--text-encoder", "qwen2.5-vl"], "text_encoder.name", "'umt5-tiny'", "'qwen2.5-vl-tiny'"),
        (["--frames", "5"], "build.frames", "9", "5"),
        (["--resolution", "128"], "build.resolution", "64", "128"),
        (["--alignment", "32"], "build.alignment", "64", "32"),
        (["--caption-strategy", "filename"], "build.caption_strategy", "'textfile'", "'filename'"),
    ],
)  # fmt: skip
def test_output_dir_built_another_way_is_refused(
    source: Path, built: Path, tmp_path: Path, capsys, flags: list[str], field: str, old: str, new: str
):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    before = _snapshot(out)
    # argparse keeps the last of a repeated flag, so `flags` override the defaults of `_build`.
    assert _build(source, out, *flags) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a different manifest: {field} is {old} there, {new} in this build" in err
    assert "another --out" in err and f"delete {out}" in err
    assert _snapshot(out) == before  # refused before anything changed


def test_output_dir_with_another_vae_is_refused_before_any_weights_are_read(
    source: Path, built: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    before = _snapshot(out)
    # A checkpoint root of configs only: the refusal must come before a weight file is looked for.
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "vae").mkdir(parents=True)
    (checkpoint / "text_encoder").mkdir()
    (checkpoint / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    UMT5Config().save_pretrained(checkpoint / "text_encoder")
    args = ["build", "--clips", str(source / "clips"), "--start-frames", str(source / "start_frames"), "--out",
            str(out), "--dataset-id", "bad", "--resolution", "64", "--frames", str(DEMO_FRAMES), "--checkpoint-root",
            str(checkpoint), "--local"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    recorded = json.loads((out / "manifest.json").read_text())["vae"]["config_hash"]
    wanted = vae_config_fingerprint(checkpoint)["config_hash"]
    assert f"vae.config_hash is {recorded!r} there, {wanted!r} in this build" in err
    assert "text_encoder.name is 'umt5-tiny' there, 'umt5' in this build" in err
    assert _snapshot(out) == before
