"""`python -m launch.validate`: a preview from a start frame and a prompt, and its errors on bad input."""

import json

import av
import numpy as np
from PIL import Image
from validate_helpers import SIZE, write_config, write_lora

from launch.validate import main
from longcat_dist.config import load_config


def _start_frame(path):
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[10:30, 20:40] = (255, 0, 0)
    Image.fromarray(pixels).save(path)
    return path


def test_preview_writes_a_playable_clip_with_the_requested_frames(tmp_path, capsys):
    config = write_config(tmp_path, validation_using_datasets=False, validation_steps=0)
    lora_path = write_lora(load_config(config), tmp_path / "lora.safetensors", step=7)
    start = _start_frame(tmp_path / "start.png")
    status = main(["--config", str(config), "--lora", str(lora_path), "--start-frame", str(start),
                   "--prompt", "a red square moves left", "--frames", "9", "--steps", "2", "--step", "7",
                   "--output", str(tmp_path / "preview")])  # fmt: skip
    assert status == 0
    video = tmp_path / "preview" / "validation" / "step_0000007" / "prompt.mp4"
    assert f"preview: {video}" in capsys.readouterr().out
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (SIZE, SIZE, 3)
    metrics = json.loads((video.parent / "metrics.json").read_text())
    assert (
        metrics["lora_path"] == str(lora_path)
        and metrics["samples"][0]["caption"] == "a red square moves left"
    )
    assert 'src="validation/step_0000007/prompt.mp4"' in (tmp_path / "preview" / "index.html").read_text()


def test_bad_input_is_named_and_exits_2(tmp_path, capsys):
    config = write_config(tmp_path, validation_using_datasets=False, validation_steps=0)
    start = _start_frame(tmp_path / "start.png")
    base = ["--config", str(config), "--prompt", "x"]
    assert main([*base, "--start-frame", str(tmp_path / "nope.png")]) == 2
    assert "--start-frame" in capsys.readouterr().err
    assert main([*base, "--start-frame", str(start), "--lora", str(tmp_path / "gone.safetensors")]) == 2
    assert "gone.safetensors: file not found" in capsys.readouterr().err
    assert main([*base, "--start-frame", str(start), "--frames", "8"]) == 2
    assert "validation_num_video_frames" in capsys.readouterr().err
